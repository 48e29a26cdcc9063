"""The quantised baselines AWQ is measured against: round-to-nearest at the same group size, and
bitsandbytes NF4. Each is the full-precision model with its decoder linears replaced in place."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.int4.linear import AWQLinear, replace_linear
from r1v_quant.model.layout import is_quant_linear
from r1v_quant.quant.primitives import awq_tensors


def rtn_linear(linear: nn.Linear, group_size: int, name: str = "") -> AWQLinear:
    """Round-to-nearest quantisation of a float linear (no activation-aware scaling)."""
    t = awq_tensors(linear.weight.detach(), group_size)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return AWQLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"], bias, group_size, name)


def quant_linear_names(model: nn.Module) -> list[str]:
    """The decoder linears AWQ quantises, still in float."""
    return [n for n, m in model.named_modules() if is_quant_linear(n) and isinstance(m, nn.Linear)]


def build_rtn(reference: Path, group_size: int, device: str | None, dtype: str):
    """The reference with every quantised linear rounded to nearest (4 bits, same group
    size, no activation-aware scaling): what AWQ is measured against."""
    from r1v_quant.model.r1v import load_model

    loaded = load_model(reference, device=device, dtype=dtype)
    for name in quant_linear_names(loaded.model):
        replace_linear(loaded.model, name, lambda old, n=name: rtn_linear(old, group_size, n).to(loaded.device))
    return loaded


def bitsandbytes():
    """The bitsandbytes module; UserError naming the extra when it is not installed."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--baseline nf4 needs bitsandbytes: pip install 'r1v-quant[nf4]'.") from None
    return bitsandbytes


def build_nf4(reference: Path, device: str | None, dtype: str):
    """The reference with every quantised linear in bitsandbytes NF4 (4 bits, blocks of 64)."""
    from r1v_quant.model.r1v import load_model

    bnb = bitsandbytes()
    loaded = load_model(reference, device=device, dtype=dtype)

    def nf4(linear: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=loaded.dtype, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
        return layer.to(loaded.device)

    try:
        for name in quant_linear_names(loaded.model):
            replace_linear(loaded.model, name, nf4)
    except Exception as error:  # noqa: BLE001 - bitsandbytes fails in many ways on unsupported devices
        raise UserError(f"bitsandbytes could not build the NF4 baseline on {loaded.device} "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:160]}).") from None
    return loaded


def write_rtn_export(reference: Path, group_size: int, out_dir: Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """The RTN baseline as an AutoAWQ GEMM export (what vLLM loads): the reference's tensors in
    order, each quantised linear rounded to nearest at `group_size`, the rest copied; the same
    codes `build_rtn` puts in memory."""
    import json

    from r1v_quant.int4.format import AWQ_LEAVES
    from r1v_quant.model.checkpoint import Checkpoint, ShardWriter
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.export import copy_side_files, export_config, side_files

    reference, out_dir = Path(reference), Path(out_dir)
    side_files(reference)  # a bad side file stops us before any tensor is written
    cfg = load_config(reference)
    ckpt = Checkpoint(reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    for name in ckpt.names():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and is_quant_linear(module):
            tensors = awq_tensors(ckpt.get(name), group_size)
            for leaf in AWQ_LEAVES:
                writer.add(f"{module}.{leaf}", tensors[leaf])
            ckpt.release()
        else:
            writer.add(name, ckpt.get(name))
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(export_config(cfg, group_size), indent=2) + "\n")
    copy_side_files(reference, out_dir)
    return out_dir
