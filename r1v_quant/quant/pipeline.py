"""The layer-by-layer AWQ pass over the language model, with memory flat in depth.

Only the vision encoder, `mlp1` and the embeddings are loaded to build the first layer's inputs;
after that one decoder layer at a time is read from the safetensors, searched, quantised and
dropped. Activations between layers live on the CPU (spilled to disk above a threshold), and each
finished layer is saved to a work folder so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import llm_linear_shapes
from r1v_quant.quant.activations import ActivationStore
from r1v_quant.quant.awq import apply_clip, fold_scales, search_clip, search_scales, token_weights
from r1v_quant.quant.primitives import awq_dequantize, awq_tensors, check_awq_shape, fake_quantize
from r1v_quant.quant.workdir import LayerReport, WorkFolder

NO_CLIP = ("q_proj", "k_proj")  # softmax amplifies their errors, so AWQ leaves their range alone


@dataclass(frozen=True)
class AWQSettings:
    group_size: int = 128
    grid: int = 20
    clip: bool = True
    duo: bool = True
    propagate: str = "quantized"  # feed layer i+1 with layer i's quantised ("quantized") or float ("float") outputs
    balance: bool = True  # image and text tokens weigh half each in the searches
    seq_len: int = 2048
    max_tokens: int = 65536
    samples: int = 128
    seed: int = 0

    def fingerprint(self, model_dir: Path, calib: str) -> str:
        blob = json.dumps({**asdict(self), "model": str(Path(model_dir).resolve()), "calib": calib}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    """Float outputs of the layer and the inputs of its four linear groups, over all real tokens."""
    names = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "down": layer.mlp.down_proj}
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    hooks = [m.register_forward_hook(lambda _m, args, _o, k=k: feats[k].append(args[0].reshape(-1, args[0].shape[-1])))
             for k, m in names.items()]
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


def _linears(layer) -> dict[str, nn.Linear]:
    a, m = layer.self_attn, layer.mlp
    return {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
            "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}


def _relative_error(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(outs, ref))
    den = sum(r.float().pow(2).sum().item() for r in ref)
    return (num / max(den, 1e-30)) ** 0.5


def quantize_layer(runner: LayerRunner, layer: nn.Module, store: ActivationStore, s: AWQSettings,
                   dtype: torch.dtype, weights: torch.Tensor | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], LayerReport]:
    """AWQ on one decoder layer. Returns its export tensors (by name inside the layer), the next inputs, a report.

    `weights` gives each calibration token's share of the search objectives (uniform when None).
    """
    start = time.perf_counter()
    feats, fp_out, lengths = capture_inputs(runner, layer, store, dtype)
    if weights is not None:
        weights = weights.to(runner.device)
    lin = _linears(layer)
    originals = {k: m.weight.data.clone() for k, m in lin.items()}

    # Plain round-to-nearest of the untouched layer, for the report's comparison.
    for k, m in lin.items():
        m.weight.data = fake_quantize(originals[k], s.group_size).to(dtype)
    rtn_out = [runner.layer(layer, x.to(runner.device, dtype)) for x in store]
    for k, m in lin.items():
        m.weight.data = originals[k]

    def per_sample(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        # Attention mixes tokens, so it must see each sample on its own.
        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([fn(part[None])[0] for part in torch.split(x, lengths)])
        return run

    alphas = {}
    with torch.no_grad():
        attn = layer.self_attn
        groups = [
            ("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "q",
             per_sample(lambda x: runner.attention(layer, x))),
        ]
        if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
            groups.append(("o", attn.v_proj, [attn.o_proj], "o", attn.o_proj))
        groups += [
            ("gate_up", layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], "gate", layer.mlp),
            ("down", layer.mlp.up_proj, [layer.mlp.down_proj], "down", layer.mlp.down_proj),
        ]
        for tag, prev, targets, feat_key, block in groups:
            result = search_scales(targets, feats[feat_key], block, s.group_size, s.grid, s.duo, weights)
            fold_scales(prev, targets, result.scales)
            feats[feat_key] = feats[feat_key] / result.scales.to(feats[feat_key].dtype)
            alphas[tag] = result.alpha
        if s.clip:
            feat_of = {"q_proj": "q", "k_proj": "q", "v_proj": "q", "o_proj": "o", "gate_proj": "gate", "up_proj": "gate", "down_proj": "down"}
            for name, m in lin.items():
                if name in NO_CLIP:
                    continue
                max_val = search_clip(m.weight.data, feats[feat_of[name]], s.group_size, s.grid, weights=weights)
                m.weight.data = apply_clip(m.weight.data, max_val, s.group_size)
    del feats

    tensors: dict[str, torch.Tensor] = {}
    prefix = {"q_proj": "self_attn.", "k_proj": "self_attn.", "v_proj": "self_attn.", "o_proj": "self_attn.",
              "gate_proj": "mlp.", "up_proj": "mlp.", "down_proj": "mlp."}
    for name, m in lin.items():
        packed = awq_tensors(m.weight.data.float().cpu(), s.group_size)
        full = prefix[name] + name
        for suffix, t in packed.items():
            tensors[f"{full}.{suffix}"] = t
        if m.bias is not None:
            tensors[f"{full}.bias"] = m.bias.data.to(torch.bfloat16).cpu()
        # From here on the layer computes with exactly the weights that were exported.
        m.weight.data = awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], s.group_size).to(runner.device, dtype)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"{norm}.weight"] = getattr(layer, norm).weight.data.to(torch.bfloat16).cpu()
        getattr(layer, norm).weight.data = tensors[f"{norm}.weight"].to(runner.device, dtype)

    with torch.no_grad():
        q_out = [runner.layer(layer, x.to(runner.device, dtype)) for x in store]
    report = LayerReport(
        index=-1,
        rel_err_awq=_relative_error(q_out, fp_out),
        rel_err_rtn=_relative_error(rtn_out, fp_out),
        seconds=time.perf_counter() - start,
        peak_mem_mb=peak_memory_mb(runner.device),
        alphas=alphas,
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
    if begin == 0:
        masks = []
        for x, is_image in first_inputs():
            acts.append(x)
            masks.append(is_image.reshape(-1).to(torch.bool).cpu())
        if len(acts) == 0 or acts.tokens() == 0:
            raise UserError("the calibration set produced no tokens to calibrate on.")
        work.save_masks(masks)
    else:
        acts.load(work.first_acts_file())
        stored = load_file(str(work.masks_file))
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
