"""The layer-by-layer AWQ pass over the language model, with memory flat in depth.

Only the vision encoder, `mlp1` and the embeddings are loaded to build the first layer's inputs;
after that one decoder layer at a time is read from the safetensors, searched, quantised and
dropped. Activations between layers live on the CPU (spilled to disk above a threshold), and each
finished layer is saved to a work folder so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.int4.format import to_awq
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import llm_linear_shapes
from r1v_quant.model.topology import NORMS, QUANT_LINEARS, QWEN2_GROUPS, ScaleGroup
from r1v_quant.quant.activations import ActivationStore
from r1v_quant.quant.awq import (
    Chunks,
    ScaleResult,
    apply_clip,
    clip_sample,
    fold_scales,
    search_clip,
    search_scales_chunked,
    token_weights,
)
from r1v_quant.quant.chunks import (
    CLIP_TOKENS,
    ChunkPlan,
    TokenStore,
    default_budget,
    peak_memory_mb,
    plan_chunks,
    sample_bounds,
    token_bounds,
)
from r1v_quant.quant.gptq import accumulate_hessian, gptq_quantize
from r1v_quant.quant.head import check_head, quantize_head
from r1v_quant.quant.host_memory import release_freed_host_memory
from r1v_quant.quant.keep import layer_scales, measure_gains, snapshot
from r1v_quant.quant.primitives import awq_dequantize, awq_tensors, check_awq_shape, dequantize, fake_quantize
from r1v_quant.quant.recipe import AWQSettings
from r1v_quant.quant.workdir import LayerReport, WorkFolder


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


DOWN = "mlp.down_proj"
GATE = "mlp.gate_proj"


def run_layer(runner: LayerRunner, layer: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """One sample [1, T, D] through the decoder layer; past `chunk` tokens its MLP runs chunk by chunk."""
    if x.shape[1] <= chunk:
        return runner.layer(layer, x)
    # The decoder layer's own forward, with the per-token half split: attention still sees the whole sample.
    h = x + runner.attention(layer, layer.input_layernorm(x))
    y = layer.post_attention_layernorm(h)
    return h + torch.cat([layer.mlp(y[:, a:b]) for a, b in token_bounds(x.shape[1], chunk)], dim=1)


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


@dataclass
class Captured:
    """What one float pass over the calibration tokens leaves for the searches."""

    feats: dict[str, TokenStore]          # each group's input, over all tokens (down's only if the plan keeps it)
    clip_rows: dict[str, torch.Tensor]    # each group's input at the clip search's token sample
    fp_out: TokenStore                    # the float layer's outputs
    lengths: list[int]
    down_mean: torch.Tensor | None        # down's weighted mean |input| when its inputs are not kept


def capture(runner: LayerRunner, layer: nn.Module, store: ActivationStore, dtype: torch.dtype, plan: ChunkPlan,
            weights: torch.Tensor, clip_idx: torch.Tensor) -> Captured:
    """Float pass: the layer outputs and the inputs each scale group reads, chunk by chunk."""
    lengths = [store[i].shape[1] for i in range(len(store))]
    total, dev = sum(lengths), runner.device
    keys = [g.reads for g in QWEN2_GROUPS]
    width = {k: layer.get_submodule(k).in_features for k in keys}
    feats = {k: TokenStore(total, width[k], dtype, dev, plan.stored_on_device)
             for k in keys if k != DOWN or plan.keep_down_inputs}
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in keys if k not in feats}
    seen = dict.fromkeys(keys, 0)
    down_sum: list[torch.Tensor] = []
    clip_dev = clip_idx.to(dev)

    def hook(k):
        def grab(_m, args, _o):
            x = args[0].reshape(-1, width[k])
            a, b = seen[k], seen[k] + x.shape[0]
            if k in feats:
                feats[k].append(x)
            else:
                sel = clip_dev[(clip_dev >= a) & (clip_dev < b)] - a
                rows[k].append(x[sel])
                part = (x.float().abs() * weights[a:b].reshape(-1, 1).to(torch.float32)).sum(0)
                down_sum.append(part if not down_sum else down_sum.pop() + part)
            seen[k] = b
        return grab

    hooks = [layer.get_submodule(k).register_forward_hook(hook(k)) for k in keys]
    fp_out = TokenStore(total, layer.input_layernorm.weight.shape[0], dtype, dev, plan.stored_on_device)
    try:
        with torch.no_grad():
            for x in store:
                out = run_layer(runner, layer, x.to(dev, dtype), plan.chunk_tokens)
                fp_out.append(out[0])
    finally:
        for h in hooks:
            h.remove()
    clip_rows = {k: feats[k].rows(clip_idx) if k in feats else torch.cat(rows[k]) for k in keys}
    return Captured(feats, clip_rows, fp_out, lengths, down_sum[0] if down_sum else None)


def layer_error(runner: LayerRunner, layer: nn.Module, store: ActivationStore, cap: Captured, dtype: torch.dtype,
                chunk: int, keep: list[torch.Tensor] | None = None) -> float:
    """Relative error of the layer's outputs against the float outputs, sample by sample.

    `keep`, when given, receives each sample's outputs on the host (the next layer's inputs).
    """
    num = den = 0.0
    start = 0
    with torch.no_grad():
        for x, n in zip(store, cap.lengths):
            out = run_layer(runner, layer, x.to(runner.device, dtype), chunk)
            ref = cap.fp_out.chunk(start, start + n)[None]
            num += (out.float() - ref.float()).pow(2).sum().item()
            den += ref.float().pow(2).sum().item()
            if keep is not None:
                keep.append(out.cpu())
            start += n
    return (num / max(den, 1e-30)) ** 0.5


@dataclass
class LayerSearch:
    """What the searches chose for one layer, as data: per group its scales and alpha, per linear its clip."""

    scales: dict[str, ScaleResult] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def alphas(self) -> dict[str, float]:
        return {name: r.alpha for name, r in self.scales.items()}


def _block(runner: LayerRunner, layer: nn.Module, group: ScaleGroup, lengths: list[int] | None
           ) -> Callable[[torch.Tensor], torch.Tensor]:
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


def group_chunks(runner: LayerRunner, layer: nn.Module, g: ScaleGroup, cap: Captured, weights: torch.Tensor,
                 chunk: int) -> Chunks:
    """The chunks a group's scale search iterates over: whole samples for attention, token ranges otherwise."""
    total = sum(cap.lengths)
    if g.mixes_tokens:
        starts = [0]
        for n in cap.lengths:
            starts.append(starts[-1] + n)
        bounds = sample_bounds(cap.lengths, chunk)
        blocks = [_block(runner, layer, g, [b - a for a, b in zip(starts, starts[1:]) if a >= lo and b <= hi])
                  for lo, hi in bounds]
    else:
        bounds = token_bounds(total, chunk)
        blocks = [_block(runner, layer, g, None)] * len(bounds)
    if g.reads in cap.feats:
        store = cap.feats[g.reads]
        return lambda: ((store.chunk(a, b), weights[a:b], blk) for (a, b), blk in zip(bounds, blocks))
    mlp, gate = layer.mlp, cap.feats[GATE]

    def recomputed():
        # down_proj's inputs are not kept: rebuilt per chunk from the gate inputs with the float weights.
        for (a, b), blk in zip(bounds, blocks):
            xg = gate.chunk(a, b)
            yield mlp.act_fn(mlp.gate_proj(xg)) * mlp.up_proj(xg), weights[a:b], blk
    return recomputed


def search_layer_scales(runner: LayerRunner, layer: nn.Module, cap: Captured, s: AWQSettings, weights: torch.Tensor,
                        plan: ChunkPlan) -> LayerSearch:
    """The scale search of every group, on the untouched layer (each group restores its weights).

    Searching all groups before folding any is exact: no group's search reads a weight that an
    earlier group's fold changes (the folds touch norms, the group's own linears and prev linears
    that later searches do not run). So down's inputs can be rebuilt from the float gate/up weights.
    """
    found = LayerSearch()
    keep = (lambda t: t) if plan.stored_on_device else (lambda t: t.cpu())
    for g in QWEN2_GROUPS:
        if not foldable(layer, g):
            continue
        targets = [layer.get_submodule(n) for n in g.linears]
        chunks = group_chunks(runner, layer, g, cap, weights, plan.chunk_tokens)
        x_mean = cap.down_mean if g.reads not in cap.feats else None
        found.scales[g.name] = search_scales_chunked(targets, chunks, s.group_size, s.grid, s.duo, x_mean=x_mean,
                                                     keep=keep)
    return found


def apply_scales(layer: nn.Module, cap: Captured, found: LayerSearch, chunk: int) -> None:
    """Fold each group's scales into the layer, in table order, and rescale the captured inputs to match."""
    for g in QWEN2_GROUPS:
        if g.name not in found.scales:
            continue
        scales = found.scales[g.name].scales
        fold_scales(layer.get_submodule(g.prev), [layer.get_submodule(n) for n in g.linears], scales)
        if g.reads in cap.feats:
            cap.feats[g.reads].divide_(scales, chunk)
        rows = cap.clip_rows[g.reads]
        cap.clip_rows[g.reads] = rows / scales.to(rows.device, rows.dtype)


def search_layer_clips(layer: nn.Module, cap: Captured, s: AWQSettings, weights: torch.Tensor,
                       clip_idx: torch.Tensor, found: LayerSearch) -> None:
    """The clip threshold of each clipped linear, on the scaled weights and the scaled inputs' token sample."""
    w_rows = weights[clip_idx.to(weights.device)]
    for g in QWEN2_GROUPS:
        for name in g.clip:
            found.clips[name] = search_clip(layer.get_submodule(name).weight.data, cap.clip_rows[g.reads], s.group_size,
                                            s.grid, tokens=CLIP_TOKENS, weights=w_rows)


def apply_clips(layer: nn.Module, found: LayerSearch, group_size: int) -> None:
    for name, max_val in found.clips.items():
        m = layer.get_submodule(name)
        m.weight.data = apply_clip(m.weight.data, max_val, group_size)


def rtn_error(runner: LayerRunner, layer: nn.Module, store: ActivationStore, cap: Captured, s: AWQSettings,
              dtype: torch.dtype, chunk: int) -> float:
    """The relative error of plain round-to-nearest weights, for the report's comparison; weights restored."""
    lin = linears_of(layer)
    originals = {k: m.weight.data.clone() for k, m in lin.items()}
    for k, m in lin.items():
        m.weight.data = fake_quantize(originals[k], s.group_size).to(dtype)
    err = layer_error(runner, layer, store, cap, dtype, chunk)
    for k, m in lin.items():
        m.weight.data = originals[k]
    return err


def pack_layer(layer: nn.Module, group_size: int, device: torch.device, dtype: torch.dtype,
               packed: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The layer's export tensors (by name inside the layer); the layer then computes with exactly those weights.

    A linear found in `packed` (its AutoAWQ tensors, from GPTQ) is stored as given; the others are
    rounded to nearest here.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, m in linears_of(layer).items():
        leaves = (packed or {}).get(name) or awq_tensors(m.weight.data.float().cpu(), group_size)
        for suffix, t in leaves.items():
            tensors[f"{name}.{suffix}"] = t
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.data.to(torch.bfloat16).cpu()
        m.weight.data = awq_dequantize(leaves["qweight"], leaves["qzeros"], leaves["scales"], group_size).to(device, dtype)
    for norm in NORMS:
        tensors[f"{norm}.weight"] = getattr(layer, norm).weight.data.to(torch.bfloat16).cpu()
        getattr(layer, norm).weight.data = tensors[f"{norm}.weight"].to(device, dtype)
    return tensors


def round_as_stored(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Norms and biases rounded to the bf16 the export stores them in, so later inputs are the served ones."""
    for norm in NORMS:
        mod = getattr(layer, norm)
        mod.weight.data = mod.weight.data.to(torch.bfloat16).to(device, dtype)
    for m in linears_of(layer).values():
        if m.bias is not None:
            m.bias.data = m.bias.data.to(torch.bfloat16).to(device, dtype)


def linear_inputs(runner: LayerRunner, layer: nn.Module, reads: str, x: torch.Tensor, chunk: int
                  ) -> Iterable[tuple[int, torch.Tensor]]:
    """(first token, input rows) of the linear `reads` for one sample x [1, T, D], with the layer's current weights.

    Only what feeds that linear is computed: the attention for o_proj and the MLP's inputs, the
    MLP's first half (token chunk by chunk) for down_proj.
    """
    h = layer.input_layernorm(x)
    if reads == QWEN2_GROUPS[0].reads:
        yield 0, h[0]
        return
    attn = layer.self_attn
    if reads == QWEN2_GROUPS[1].reads:
        grabbed: list[torch.Tensor] = []
        hook = attn.o_proj.register_forward_hook(lambda _m, args, _o: grabbed.append(args[0]))
        try:
            runner.attention(layer, h)
        finally:
            hook.remove()
        yield 0, grabbed[0].reshape(-1, attn.o_proj.in_features)
        return
    y = layer.post_attention_layernorm(x + runner.attention(layer, h))[0]
    mlp = layer.mlp
    for a, b in token_bounds(y.shape[0], chunk):
        yield a, (y[a:b] if reads == GATE else mlp.act_fn(mlp.gate_proj(y[a:b])) * mlp.up_proj(y[a:b]))


@dataclass
class GPTQNotes:
    """What the report says of a layer's GPTQ rounding: per linear, raised dampening and dead input channels."""

    damp: dict[str, float] = field(default_factory=dict)   # only linears whose factorisation needed more dampening
    dead: dict[str, int] = field(default_factory=dict)     # only linears with dead input channels


def gptq_layer(runner: LayerRunner, layer: nn.Module, store: ActivationStore, s: AWQSettings, weights: torch.Tensor,
               clips: dict[str, torch.Tensor], dtype: torch.dtype, chunk: int
               ) -> tuple[dict[str, dict[str, torch.Tensor]], GPTQNotes]:
    """GPTQ codes of every linear, group by group in the layer's order, each from its inputs as they will be served.

    The scales are folded before this, and each linear's inputs are recomputed after the linears
    before it are quantised: q/k/v read the folded norm, o_proj the attention of quantised q/k/v,
    gate/up the residual stream after the quantised attention, down_proj the quantised gate/up.
    A clip threshold sets its linear's group ranges; the feedback rounds the unclipped weights.
    Each quantised linear's weight is left as its stored tensors dequantise.
    """
    packed: dict[str, dict[str, torch.Tensor]] = {}
    notes = GPTQNotes()
    dev = runner.device
    round_as_stored(layer, dev, dtype)
    for g in QWEN2_GROUPS:
        width = layer.get_submodule(g.reads).in_features

        def chunks(reads: str = g.reads):
            start = 0
            for x in store:
                for a, rows in linear_inputs(runner, layer, reads, x.to(dev, dtype), chunk):
                    yield rows, weights[start + a:start + a + rows.shape[0]]
                start += x.shape[1]

        hess = accumulate_hessian(chunks(), width, dev)
        for name in g.linears:
            m = layer.get_submodule(name)
            w = m.weight.data
            rng = apply_clip(w.float(), clips[name], s.group_size) if name in clips else None
            res = gptq_quantize(w, hess, s.group_size, s.gptq_damp, range_weight=rng)
            del rng
            packed[name] = to_awq(res.codes.cpu(), res.zeros.cpu(), res.scales.cpu())
            m.weight.data = dequantize(res.codes, res.scales, res.zeros, s.group_size).to(dev, dtype)
            if res.retries:
                notes.damp[name] = res.damp
            if res.dead:
                notes.dead[name] = res.dead
            del res
        del hess
    return packed, notes


def layer_plan(layer: nn.Module, tokens: int, budget: int | None, device: torch.device, dtype: torch.dtype) -> ChunkPlan:
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    hidden = layer.input_layernorm.weight.shape[0]
    intermediate = layer.mlp.down_proj.in_features
    act = torch.empty((), dtype=dtype).element_size()
    return plan_chunks(tokens, hidden, intermediate, weight_bytes, default_budget(device) if budget is None else budget,
                       act)


def quantize_layer(runner: LayerRunner, layer: nn.Module, store: ActivationStore, s: AWQSettings,
                   dtype: torch.dtype, weights: torch.Tensor | None = None, budget: int | None = None,
                   plan: ChunkPlan | None = None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], LayerReport]:
    """AWQ on one decoder layer: capture -> search scales -> apply -> search clips -> apply -> pack -> report.

    Returns its export tensors (by name inside the layer), the next layer's inputs (on the host), and
    a report. `weights` gives each calibration token's share of the search objectives (uniform when
    None). Chunk size and placement come from `plan`, else from `plan_chunks` within `budget` bytes.
    """
    start = time.perf_counter()
    total = sum(store[i].shape[1] for i in range(len(store)))
    weights = (torch.full((total,), 1.0 / total) if weights is None else weights).to(runner.device)
    plan = plan or layer_plan(layer, total, budget, runner.device, dtype)
    clip_idx = clip_sample(total, CLIP_TOKENS)
    cap = capture(runner, layer, store, dtype, plan, weights, clip_idx)
    rel_rtn = rtn_error(runner, layer, store, cap, s, dtype, plan.chunk_tokens)
    packed, notes = None, GPTQNotes()
    with torch.no_grad():
        found = search_layer_scales(runner, layer, cap, s, weights, plan)
        apply_scales(layer, cap, found, plan.chunk_tokens)
        # The float weights a group returns to when its sensitivity is measured (quant/keep.py).
        floats = snapshot(linears_of(layer)) if s.sensitivity else None
        if s.clip:
            search_layer_clips(layer, cap, s, weights, clip_idx, found)
            if s.rounding == "nearest":
                apply_clips(layer, found, s.group_size)
        cap.feats.clear()
        cap.clip_rows.clear()
        if s.rounding == "gptq":
            packed, notes = gptq_layer(runner, layer, store, s, weights, found.clips, dtype, plan.chunk_tokens)
    tensors = pack_layer(layer, s.group_size, runner.device, dtype, packed)
    tensors.update(layer_scales(found.scales))  # so the export can store any group in bf16 (quant/keep.py)

    q_out: list[torch.Tensor] = []
    rel_awq = layer_error(runner, layer, store, cap, dtype, plan.chunk_tokens,
                          keep=q_out if s.propagate == "quantized" else None)
    gains = {} if floats is None else measure_gains(
        lambda: layer_error(runner, layer, store, cap, dtype, plan.chunk_tokens), linears_of(layer), floats, rel_awq)
    del floats
    if s.propagate == "float":
        bounds = [0]
        for n in cap.lengths:
            bounds.append(bounds[-1] + n)
        q_out = [cap.fp_out.chunk(a, b)[None].cpu() for a, b in zip(bounds, bounds[1:])]
    report = LayerReport(
        index=-1,
        rel_err_awq=rel_awq,
        rel_err_rtn=rel_rtn,
        seconds=time.perf_counter() - start,
        peak_mem_mb=peak_memory_mb(runner.device),
        alphas=found.alphas,
        gptq_damp=notes.damp,
        gptq_dead=notes.dead,
        sensitivity=gains,
    )
    return tensors, q_out, report


def validate_group_size(cfg: R1VConfig, group_size: int, lm_head: bool = False) -> None:
    for name, (out_f, in_f) in llm_linear_shapes(cfg, 0).items():
        check_awq_shape(out_f, in_f, group_size, name.split(".", 4)[-1])
    if lm_head:
        check_head(cfg, group_size)


def run_awq(cfg: R1VConfig, ckpt: Checkpoint, first_inputs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
            settings: AWQSettings,
            work: WorkFolder, device: torch.device, resume: bool = False, offload_dir: Path | None = None,
            offload_above: int = 8 * 1024**3, dtype: torch.dtype = torch.float32, progress: Callable[[int, int, LayerReport | None], None] | None = None,
            stop_after: int | None = None, max_device_memory: int | None = None) -> list[LayerReport]:
    """Quantise every decoder layer in order, then lm_head when `settings.lm_head`; results land in `work`.

    Returns one report per layer, and lm_head's last (its index is the number of layers).
    `stop_after` simulates an interruption.

    `max_device_memory` (bytes; default `chunks.default_budget`) bounds each layer's working set.

    `first_inputs` yields, per sample, its input embeddings [1, T, D] and which of its T tokens are image tokens.
    """
    validate_group_size(cfg, settings.group_size, settings.lm_head)
    begin = work.start(resume)
    acts = ActivationStore(offload_dir, offload_above, tag="in")
    total = cfg.num_layers
    head_pending = settings.lm_head and not work.head_done()
    if begin == 0:
        masks = []
        for x, is_image in first_inputs():
            acts.append(x)
            masks.append(is_image.reshape(-1).to(torch.bool).cpu())
        if len(acts) == 0 or acts.tokens() == 0:
            raise UserError("the calibration set produced no tokens to calibrate on.")
        work.save_masks(masks)
    else:
        if begin < total or head_pending:
            acts.load(work.first_acts_file())
        stored = load_file(str(work.masks_file))
        masks = [stored[f"s{i}"] for i in range(len(stored))]
    weights = token_weights(torch.cat(masks), settings.balance)
    runner = LayerRunner(cfg, device)
    for i in range(begin, total):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        layer = load_decoder_layer(cfg, ckpt, i, device, dtype)
        tensors, nxt, report = quantize_layer(runner, layer, acts, settings, dtype, weights, budget=max_device_memory)
        report.index = i
        del layer
        acts.clear()
        for x in nxt:
            acts.append(x.to(torch.float32) if x.dtype != torch.float32 else x)
        del nxt
        work.finish_layer(i, tensors, report, acts)
        del tensors
        release_freed_host_memory()
        if progress:
            progress(i, total, report)
        if stop_after is not None and i >= stop_after:
            raise KeyboardInterrupt
    if head_pending:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tensors, report = quantize_head(cfg, ckpt, acts, settings, device, dtype, weights, budget=max_device_memory)
        work.finish_head(tensors, report)
        if progress:
            progress(total, total, report)
    acts.clear()
    return work.reports(total) + ([work.head_report()] if settings.lm_head else [])
