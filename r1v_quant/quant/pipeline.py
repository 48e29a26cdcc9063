"""The layer-by-layer AWQ pass over the language model, with memory flat in depth.

Only the vision encoder, `mlp1` and the embeddings are loaded to build the first layer's inputs;
after that one decoder layer at a time is read from the safetensors, searched, quantised and
dropped. Activations between layers live on the CPU (spilled to disk above a threshold), and each
finished layer is saved to a work folder so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.config import R1VConfig
from r1v_quant.errors import UserError
from r1v_quant.model.layout import llm_linear_shapes
from r1v_quant.quant.awq import ScaleResult, apply_clip, fold_scales, search_clip, search_scales, token_weights
from r1v_quant.quant.activations import ActivationStore
from r1v_quant.quant.primitives import awq_dequantize, awq_tensors, check_awq_shape, fake_quantize
from r1v_quant.quant.recipe import AWQSettings
from r1v_quant.quant.topology import NORMS, QUANT_LINEARS, QWEN2_GROUPS, ScaleGroup
from r1v_quant.quant.workdir import LayerReport, WorkFolder

def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_decoder_layer(cfg: R1VConfig, ckpt: Checkpoint, index: int, device: torch.device, dtype: torch.dtype):
    """One Qwen2 decoder layer from transformers, filled from the checkpoint: nothing else is read."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from r1v_quant.model.r1v import assign_tensor

    qcfg = cfg.qwen2_config()
    qcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(qcfg, layer_idx=index)
    prefix = f"language_model.model.layers.{index}."
    for name in ckpt.with_prefix(prefix):
        assign_tensor(layer, name[len(prefix):], ckpt.get(name).to(device=device, dtype=dtype))
    # Streaming only works if what was read is let go: otherwise mapped shard pages pile up with depth.
    ckpt.release()
    missing = [n for n, p in layer.state_dict(keep_vars=True).items() if p.is_meta]
    if missing:
        raise UserError(f"{ckpt.dir} lacks {prefix}{missing[0]}.")
    return layer.eval().requires_grad_(False)


class LayerRunner:
    """Runs one decoder layer over variable-length samples, one sample at a time (no padding anywhere)."""

    def __init__(self, cfg: R1VConfig, device: torch.device):
        from r1v_quant.model.r1v import rotary_embedding

        self.rotary = rotary_embedding(cfg.qwen2_config(), device)
        self.device = device
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, length: int, dtype: torch.dtype):
        if length not in self._cache:
            x = torch.zeros(1, length, 1, device=self.device)
            pos = torch.arange(length, device=self.device)[None]
            self._cache[length] = self.rotary(x, pos)
        cos, sin = self._cache[length]
        return cos.to(dtype), sin.to(dtype)

    def layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=self.device)[None]
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=self.positions(x.shape[1], x.dtype))
        return out[0] if isinstance(out, tuple) else out

    def attention(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer.self_attn(hidden_states=x, attention_mask=None, position_embeddings=self.positions(x.shape[1], x.dtype))
        return out[0] if isinstance(out, tuple) else out


def capture_inputs(runner: LayerRunner, layer: nn.Module, store: ActivationStore, dtype: torch.dtype):
    """Float outputs of the layer and the inputs each scale group reads, over all real tokens."""
    keys = [g.reads for g in QWEN2_GROUPS]
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    hooks = [layer.get_submodule(k).register_forward_hook(
        lambda _m, args, _o, k=k: feats[k].append(args[0].reshape(-1, args[0].shape[-1]))) for k in keys]
    outputs, lengths = [], []
    try:
        with torch.no_grad():
            for x in store:
                x = x.to(runner.device, dtype)
                outputs.append(runner.layer(layer, x))
                lengths.append(x.shape[1])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, outputs, lengths


def linears_of(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: layer.get_submodule(name) for name in QUANT_LINEARS}


def foldable(layer: nn.Module, group: ScaleGroup) -> bool:
    """Whether the group's scales can be folded into its previous op.

    A linear absorbs them only if its outputs are the group's inputs one to one: with grouped KV
    heads v_proj is narrower than o_proj's input, so the o group is skipped there.
    """
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        return prev.out_features == layer.get_submodule(group.linears[0]).in_features
    return True


def _relative_error(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(outs, ref))
    den = sum(r.float().pow(2).sum().item() for r in ref)
    return (num / max(den, 1e-30)) ** 0.5


@dataclass
class LayerSearch:
    """What the searches chose for one layer, as data: per group its scales and alpha, per linear its clip."""

    scales: dict[str, ScaleResult] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def alphas(self) -> dict[str, float]:
        return {name: r.alpha for name, r in self.scales.items()}


def _block(runner: LayerRunner, layer: nn.Module, group: ScaleGroup, lengths: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    if group.block == "self_attn":
        def fn(x: torch.Tensor) -> torch.Tensor:
            return runner.attention(layer, x)
    else:
        fn = layer.get_submodule(group.block)
    if not group.mixes_tokens:
        return fn

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        # Attention mixes tokens, so it must see each sample on its own.
        return torch.cat([fn(part[None])[0] for part in torch.split(x, lengths)])
    return per_sample


def rtn_outputs(runner: LayerRunner, layer: nn.Module, store: ActivationStore, s: AWQSettings, dtype: torch.dtype):
    """The layer's outputs with plain round-to-nearest weights, for the report's comparison; weights restored."""
    lin = linears_of(layer)
    originals = {k: m.weight.data.clone() for k, m in lin.items()}
    for k, m in lin.items():
        m.weight.data = fake_quantize(originals[k], s.group_size).to(dtype)
    with torch.no_grad():
        out = [runner.layer(layer, x.to(runner.device, dtype)) for x in store]
    for k, m in lin.items():
        m.weight.data = originals[k]
    return out


def search_layer_scales(runner: LayerRunner, layer: nn.Module, feats: dict[str, torch.Tensor], lengths: list[int],
                        s: AWQSettings, weights: torch.Tensor | None) -> LayerSearch:
    """The scale search of every group, on the untouched layer (each group restores its weights).

    Searching all groups before folding any is exact: no group's search reads a weight that an
    earlier group's fold changes (the folds touch norms, the group's own linears and prev linears
    that later searches do not run).
    """
    found = LayerSearch()
    for g in QWEN2_GROUPS:
        if not foldable(layer, g):
            continue
        targets = [layer.get_submodule(n) for n in g.linears]
        found.scales[g.name] = search_scales(targets, feats[g.reads], _block(runner, layer, g, lengths),
                                             s.group_size, s.grid, s.duo, weights)
    return found


def apply_scales(layer: nn.Module, feats: dict[str, torch.Tensor], found: LayerSearch) -> None:
    """Fold each group's scales into the layer, in table order, and rescale the captured inputs to match."""
    for g in QWEN2_GROUPS:
        if g.name not in found.scales:
            continue
        scales = found.scales[g.name].scales
        fold_scales(layer.get_submodule(g.prev), [layer.get_submodule(n) for n in g.linears], scales)
        feats[g.reads] = feats[g.reads] / scales.to(feats[g.reads].dtype)


def search_layer_clips(layer: nn.Module, feats: dict[str, torch.Tensor], s: AWQSettings,
                       weights: torch.Tensor | None, found: LayerSearch) -> None:
    """The clip threshold of each clipped linear, on the scaled weights and inputs."""
    for g in QWEN2_GROUPS:
        for name in g.clip:
            found.clips[name] = search_clip(layer.get_submodule(name).weight.data, feats[g.reads], s.group_size,
                                            s.grid, weights=weights)


def apply_clips(layer: nn.Module, found: LayerSearch, group_size: int) -> None:
    for name, max_val in found.clips.items():
        m = layer.get_submodule(name)
        m.weight.data = apply_clip(m.weight.data, max_val, group_size)


def pack_layer(layer: nn.Module, group_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's export tensors (by name inside the layer); the layer then computes with exactly those weights."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in linears_of(layer).items():
        packed = awq_tensors(m.weight.data.float().cpu(), group_size)
        for suffix, t in packed.items():
            tensors[f"{name}.{suffix}"] = t
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.data.to(torch.bfloat16).cpu()
        m.weight.data = awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], group_size).to(device, dtype)
    for norm in NORMS:
        tensors[f"{norm}.weight"] = getattr(layer, norm).weight.data.to(torch.bfloat16).cpu()
        getattr(layer, norm).weight.data = tensors[f"{norm}.weight"].to(device, dtype)
    return tensors


def quantize_layer(runner: LayerRunner, layer: nn.Module, store: ActivationStore, s: AWQSettings,
                   dtype: torch.dtype, weights: torch.Tensor | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], LayerReport]:
    """AWQ on one decoder layer: capture -> search scales -> apply -> search clips -> apply -> pack -> report.

    Returns its export tensors (by name inside the layer), the next layer's inputs, and a report.
    `weights` gives each calibration token's share of the search objectives (uniform when None).
    """
    start = time.perf_counter()
    feats, fp_out, lengths = capture_inputs(runner, layer, store, dtype)
    if weights is not None:
        weights = weights.to(runner.device)
    rtn_out = rtn_outputs(runner, layer, store, s, dtype)
    with torch.no_grad():
        found = search_layer_scales(runner, layer, feats, lengths, s, weights)
        apply_scales(layer, feats, found)
        if s.clip:
            search_layer_clips(layer, feats, s, weights, found)
            apply_clips(layer, found, s.group_size)
    del feats
    tensors = pack_layer(layer, s.group_size, runner.device, dtype)

    with torch.no_grad():
        q_out = [runner.layer(layer, x.to(runner.device, dtype)) for x in store]
    report = LayerReport(
        index=-1,
        rel_err_awq=_relative_error(q_out, fp_out),
        rel_err_rtn=_relative_error(rtn_out, fp_out),
        seconds=time.perf_counter() - start,
        peak_mem_mb=peak_memory_mb(runner.device),
        alphas=found.alphas,
    )
    nxt = q_out if s.propagate == "quantized" else fp_out
    return tensors, nxt, report


def validate_group_size(cfg: R1VConfig, group_size: int) -> None:
    for name, (out_f, in_f) in llm_linear_shapes(cfg, 0).items():
        check_awq_shape(out_f, in_f, group_size, name.split(".", 4)[-1])


def run_awq(cfg: R1VConfig, ckpt: Checkpoint, first_inputs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
            settings: AWQSettings,
            work: WorkFolder, device: torch.device, resume: bool = False, offload_dir: Path | None = None,
            offload_above: int = 8 * 1024**3, dtype: torch.dtype = torch.float32, progress: Callable[[int, int, LayerReport | None], None] | None = None,
            stop_after: int | None = None) -> list[LayerReport]:
    """Quantise every decoder layer in order; results land in `work`. `stop_after` simulates an interruption.

    `first_inputs` yields, per sample, its input embeddings [1, T, D] and which of its T tokens are image tokens.
    """
    validate_group_size(cfg, settings.group_size)
    begin = work.start(resume)
    acts = ActivationStore(offload_dir, offload_above, tag="in")
    masks_file = work.path / "image_masks.safetensors"
    if begin == 0:
        masks = []
        for x, is_image in first_inputs():
            acts.append(x)
            masks.append(is_image.reshape(-1).to(torch.bool).cpu())
        if len(acts) == 0 or acts.tokens() == 0:
            raise UserError("the calibration set produced no tokens to calibrate on.")
        save_file({f"s{i}": m for i, m in enumerate(masks)}, str(masks_file))
    else:
        acts.load(work.path / "acts.safetensors")
        stored = load_file(str(masks_file))
        masks = [stored[f"s{i}"] for i in range(len(stored))]
    weights = token_weights(torch.cat(masks), settings.balance)
    runner = LayerRunner(cfg, device)
    total = cfg.num_layers
    for i in range(begin, total):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        layer = load_decoder_layer(cfg, ckpt, i, device, dtype)
        tensors, nxt, report = quantize_layer(runner, layer, acts, settings, dtype, weights)
        report.index = i
        del layer
        acts.clear()
        for x in nxt:
            acts.append(x.to(torch.float32) if x.dtype != torch.float32 else x)
        del nxt
        work.finish_layer(i, tensors, report, acts)
        if progress:
            progress(i, total, report)
        if stop_after is not None and i >= stop_after:
            raise KeyboardInterrupt
    acts.clear()
    return work.reports(total)
