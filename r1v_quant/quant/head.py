"""AWQ on lm_head after the last decoder layer (`awq --quantize-lm-head`).

The group is `topology.FINAL_GROUP`: lm_head reads the final norm's output, so its scales fold
into the norm's weight, and the calibration input is what the norm reads, the last decoder
layer's outputs (quantised or float ones, as `--propagate` feeds the layers). The search protects
the logits. lm_head has no bias, so a candidate's logit error is x (W' - W)^T, computed from the
weight difference token chunk by token chunk (`awq.search_linear_scales`): no float logits are
kept, and no tensor of all tokens x vocabulary exists (152064 entries per token at 38B). Then
the clip search, as for the decoder linears, and the AutoAWQ tensors, packed by output-row block.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.int4.format import AWQ_LEAVES, VLLM_VOCAB_PADDING, head_is_tied, head_rows_fit_vllm
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import FINAL_NORM, HEAD_MODULE
from r1v_quant.model.topology import FINAL_GROUP
from r1v_quant.quant.activations import ActivationStore
from r1v_quant.quant.awq import (
    ROW_BLOCK,
    apply_clip,
    clip_sample,
    fold_scales,
    search_clip,
    search_linear_scales,
    weight_delta,
)
from r1v_quant.quant.chunks import (
    CLIP_TOKENS,
    ChunkPlan,
    TokenStore,
    default_budget,
    peak_memory_mb,
    plan_head_chunks,
    token_bounds,
)
from r1v_quant.quant.primitives import awq_tensors, check_awq_shape, fake_quantize
from r1v_quant.quant.recipe import AWQSettings
from r1v_quant.quant.workdir import LayerReport


def check_head(cfg: R1VConfig, group_size: int) -> None:
    """UserError, before any work, when lm_head cannot be quantised in this checkpoint."""
    if head_is_tied(cfg.llm):
        raise UserError("--quantize-lm-head needs a separate lm_head, but this checkpoint ties it to embed_tokens "
                        "(tie_word_embeddings), so folding its scales would change the input embeddings too.")
    vocab = int(cfg.llm["vocab_size"])
    if not head_rows_fit_vllm(vocab):
        raise UserError(f"--quantize-lm-head needs a vocabulary that is a multiple of {VLLM_VOCAB_PADDING}, which vLLM "
                        f"pads lm_head to, but this checkpoint's vocab_size is {vocab}.")
    check_awq_shape(vocab, cfg.hidden_size, group_size, "lm_head")


def head_weight_bytes(cfg: R1VConfig, act_bytes: int) -> int:
    return int(cfg.llm["vocab_size"]) * cfg.hidden_size * act_bytes


def head_plan(cfg: R1VConfig, tokens: int, budget: int, act_bytes: int) -> ChunkPlan:
    """The plan `quantize_head` makes for this config, from its shapes alone (the memory model asks it too)."""
    return plan_head_chunks(tokens, cfg.hidden_size, int(cfg.llm["vocab_size"]), head_weight_bytes(cfg, act_bytes),
                            budget, act_bytes)


def load_head(cfg: R1VConfig, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype
              ) -> tuple[nn.Module, nn.Linear, torch.dtype]:
    """The final norm (transformers' Qwen2RMSNorm), lm_head, and the dtype the checkpoint stores the norm in."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for name in (FINAL_NORM + ".weight", HEAD_MODULE + ".weight"):
        if name not in ckpt.shard_of:
            raise UserError(f"{ckpt.dir} lacks {name}.")
    source_norm = ckpt.get(FINAL_NORM + ".weight")
    with torch.device("meta"):
        norm = Qwen2RMSNorm(cfg.hidden_size, eps=float(cfg.llm.get("rms_norm_eps", 1e-6)))
        head = nn.Linear(cfg.hidden_size, int(cfg.llm["vocab_size"]), bias=False)
    norm.weight = nn.Parameter(source_norm.to(device, dtype), requires_grad=False)
    head.weight = nn.Parameter(ckpt.get(HEAD_MODULE + ".weight").to(device, dtype), requires_grad=False)
    ckpt.release()
    return norm.eval(), head.eval(), source_norm.dtype


def relative_error(chunks, weight: torch.Tensor, delta: torch.Tensor) -> float:
    """||x delta^T|| / ||x weight^T|| over every chunk's tokens: the logits' relative error."""
    num = den = 0.0
    for x, _, _ in chunks():
        den += F.linear(x, weight).float().pow_(2).sum().item()
        num += F.linear(x, delta).float().pow_(2).sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def clip_rows(weight: torch.Tensor, max_val: torch.Tensor | None, group_size: int) -> None:
    """Apply the clip search's thresholds in place, one output-row block at a time."""
    if max_val is None:
        return
    for a in range(0, weight.shape[0], ROW_BLOCK):
        weight[a:a + ROW_BLOCK] = apply_clip(weight[a:a + ROW_BLOCK], max_val[a:a + ROW_BLOCK], group_size)


def pack_head(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """lm_head's AutoAWQ tensors, packed one output-row block at a time; the same bytes as packing the
    whole weight at once (groups run along the inputs, and a block holds whole int32s of 8 outputs)."""
    parts = [awq_tensors(weight[a:a + ROW_BLOCK].float().cpu(), group_size)
             for a in range(0, weight.shape[0], ROW_BLOCK)]
    return {f"{HEAD_MODULE}.{leaf}": torch.cat([p[leaf] for p in parts], dim=1).contiguous() for leaf in AWQ_LEAVES}


def quantize_head(cfg: R1VConfig, ckpt: Checkpoint, acts: ActivationStore, s: AWQSettings, device: torch.device,
                  dtype: torch.dtype, weights: torch.Tensor, budget: int | None = None,
                  ) -> tuple[dict[str, torch.Tensor], LayerReport]:
    """Scale search -> fold into the final norm -> clip search -> pack, on the last layer's outputs `acts`.

    `weights` gives each calibration token's share of the objectives. Returns the export tensors by
    checkpoint name (lm_head's qweight/qzeros/scales, and the final norm's weight in the source's
    dtype) and a report whose index is the number of decoder layers.
    """
    start = time.perf_counter()
    norm, head, norm_dtype = load_head(cfg, ckpt, device, dtype)
    total = sum(acts[i].shape[1] for i in range(len(acts)))
    act = torch.empty((), dtype=dtype).element_size()
    plan = head_plan(cfg, total, default_budget(device) if budget is None else budget, act)
    weights = weights.to(device)
    inputs = TokenStore(total, cfg.hidden_size, dtype, device, plan.stored_on_device)
    g = s.group_size
    with torch.no_grad():
        for x in acts:
            inputs.append(norm(x.to(device, dtype))[0])
        bounds = token_bounds(total, plan.chunk_tokens)

        def chunks():
            return ((inputs.chunk(a, b), weights[a:b], head) for a, b in bounds)

        w = head.weight.data
        delta = torch.empty_like(w)
        rel_rtn = relative_error(chunks, w, weight_delta(w, lambda rows, _: fake_quantize(rows, g), delta))
        del delta  # the fold below makes a new weight: two whole copies at a time, as planned
        found = search_linear_scales(w, chunks, g, s.grid, s.duo)
        fold_scales(norm, [head], found.scales)
        inputs.divide_(found.scales, plan.chunk_tokens)
        w = head.weight.data  # scaled: with the folded norm, the same logits as before
        max_val = None
        if s.clip:
            clip_idx = clip_sample(total, CLIP_TOKENS)
            max_val = search_clip(w, inputs.rows(clip_idx), g, s.grid, tokens=CLIP_TOKENS,
                                  weights=weights[clip_idx.to(weights.device)])

        def export_rows(rows: torch.Tensor, first: int) -> torch.Tensor:
            """What the export computes with, for these rows: the clipped weight, quantised."""
            if max_val is not None:
                rows = apply_clip(rows, max_val[first:first + rows.shape[0]], g)
            return fake_quantize(rows, g)

        rel_awq = relative_error(chunks, w, weight_delta(w, export_rows, torch.empty_like(w)))
        clip_rows(w, max_val, g)
        tensors = {**pack_head(w, g), FINAL_NORM + ".weight": norm.weight.data.to(norm_dtype).cpu()}
    report = LayerReport(index=cfg.num_layers, rel_err_awq=rel_awq, rel_err_rtn=rel_rtn,
                         seconds=time.perf_counter() - start, peak_mem_mb=peak_memory_mb(device),
                         alphas={FINAL_GROUP.name: found.alpha})
    return tensors, report
