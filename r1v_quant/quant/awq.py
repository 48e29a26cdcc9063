"""Activation-aware weight quantization: the scale search and the clip search, as small functions.

Split as in the AWQ reference: `search_scales` picks per-input-channel scales for a group of
linears that read the same input, `fold_scales` moves them into the previous operation so the
float function is unchanged, and `search_clip` shrinks each weight group's range afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.quant.primitives import fake_quantize


def masked_mean_abs(x: torch.Tensor, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |x| per channel over real tokens only: [..., T, C] with mask [..., T] -> [C].

    `weights` (one per real token, summing to 1) turns it into a weighted mean.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    if mask is not None:
        flat = flat[mask.reshape(-1).bool()]
    if weights is None:
        return flat.abs().mean(0)
    return (flat.abs() * weights.reshape(-1, 1).to(flat)).sum(0)


def token_weights(is_image: torch.Tensor, balance: bool = True) -> torch.Tensor:
    """Per-token weights summing to 1; balanced, image and text tokens each carry half.

    Image tokens outnumber text tokens many times over in multimodal calibration, and their
    activations differ; without balancing, scales fitted to image tokens can hurt text.
    """
    is_image = is_image.reshape(-1).bool()
    n = is_image.numel()
    n_img = int(is_image.sum())
    if not balance or n_img in (0, n):
        return torch.full((n,), 1.0 / n)
    return torch.where(is_image, 0.5 / n_img, 0.5 / (n - n_img))


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> float:
    err = (out.float() - target.float()).pow(2).reshape(-1, out.shape[-1]).mean(-1)
    if weights is None:
        return err.mean().item()
    return (err * weights.to(err)).sum().item()


def weight_magnitude(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per-input-channel mean of |w| relative to its group's max: the weight term of duo scaling."""
    w = torch.cat([t.float() for t in weights], dim=0)
    # In place on the one fresh copy: for gate+up at the 38B widths each copy is 1.1 GB in float32.
    groups = w.abs_().reshape(-1, group_size)
    groups.div_(groups.amax(dim=1, keepdim=True).clamp(min=1e-8))
    return w.mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool = True) -> torch.Tensor:
    if duo:
        s = x_mean.pow(alpha).clamp(min=1e-4) / w_mean.pow(1 - alpha).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    # Normalise so the scales are centred on 1 in log space; only their ratios matter.
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(min=1e-4)


@dataclass
class ScaleResult:
    scales: torch.Tensor
    alpha: float
    loss: float
    loss_at_zero: float  # alpha = 0 is plain round-to-nearest of the unscaled weights


# Each call yields, per chunk: its inputs [t, in], its token weights [t] (or None), and the block as it
# applies to that chunk (an attention block must split a chunk into its samples).
Chunks = Callable[[], Iterable[tuple[torch.Tensor, "torch.Tensor | None", Callable[[torch.Tensor], torch.Tensor]]]]


def search_scales(
    linears: Sequence[nn.Linear],
    x: torch.Tensor,
    block: Callable[[torch.Tensor], torch.Tensor],
    group_size: int,
    grid: int = 20,
    duo: bool = True,
    weights: torch.Tensor | None = None,
) -> ScaleResult:
    """Grid-search alpha in [0, 1) for scales s = mean|x|^a / mean|w|^(1-a) minimising block output MSE.

    `x` holds the real tokens that feed `linears` ([tokens, in]); `block(x)` recomputes the output
    being protected (the linears alone, or the attention/MLP they sit in) with the current weights.
    Weights are restored before returning.
    """
    return search_scales_chunked(linears, lambda: [(x, weights, block)], group_size, grid, duo,
                                 x_mean=masked_mean_abs(x, weights=weights))


def search_scales_chunked(
    linears: Sequence[nn.Linear],
    chunks: Chunks,
    group_size: int,
    grid: int = 20,
    duo: bool = True,
    x_mean: torch.Tensor | None = None,
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> ScaleResult:
    """`search_scales` over token chunks: `chunks()` yields (inputs, token weights, block) anew on each call.

    The objective is accumulated chunk by chunk, so only one chunk's block transient is alive at a
    time; the float target of each chunk is computed once and held through `keep` (which may move
    it off the device). `x_mean` (the weighted mean |x| per channel) is accumulated when not given.
    With None weights every token weighs the same.
    """
    originals = [lin.weight.data.clone() for lin in linears]
    with torch.no_grad():
        if x_mean is None:
            x_mean = accumulate_mean_abs(chunks)
        targets = [keep(block(x).float()) for x, _, block in chunks()]
        total = sum(t.shape[0] for t in targets)

        def loss_of(s: torch.Tensor) -> float:
            for lin, w in zip(linears, originals):
                lin.weight.data = fake_quantize(w * s, group_size).to(w.dtype) / s
            loss = 0.0
            for (x, w_tok, block), target in zip(chunks(), targets):
                out = block(x)
                target = target.to(out.device)
                loss += weighted_mse(out, target, w_tok) * (1.0 if w_tok is not None else out.shape[0] / total)
            return loss

        best = grid_search(x_mean, weight_magnitude(originals, group_size), grid, duo, originals[0].dtype, loss_of)
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    return best


def grid_search(x_mean: torch.Tensor, w_mean: torch.Tensor, grid: int, duo: bool, dtype: torch.dtype,
                loss_of: Callable[[torch.Tensor], float]) -> ScaleResult:
    """The alpha in {0, 1/grid, ...} whose candidate scales give the lowest `loss_of(scales)`."""
    best: ScaleResult | None = None
    losses: list[float] = []
    for step in range(grid):
        alpha = step / grid
        s = candidate_scales(x_mean, w_mean, alpha, duo).to(dtype)
        loss = loss_of(s)
        losses.append(loss)
        if best is None or loss < best.loss:
            best = ScaleResult(s.clone(), alpha, loss, 0.0)
    assert best is not None
    best.loss_at_zero = losses[0]
    return best


# Output rows of a large linear handled at a time where a whole-weight temporary would be too large.
ROW_BLOCK = 4096


def weight_delta(weight: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor], out: torch.Tensor,
                 rows: int = ROW_BLOCK) -> torch.Tensor:
    """out = fn(weight) - weight, output-row block by block, so no second whole-weight temporary exists.

    `fn(block, first_row)` must act on each output row alone (group-wise quantisation and clipping do).
    """
    for a in range(0, weight.shape[0], rows):
        block = weight[a:a + rows]
        out[a:a + rows] = fn(block, a).to(out.dtype) - block
    return out


def search_linear_scales(
    weight: torch.Tensor,
    chunks: Chunks,
    group_size: int,
    grid: int = 20,
    duo: bool = True,
    x_mean: torch.Tensor | None = None,
) -> ScaleResult:
    """`search_scales_chunked` for a group whose protected block is its one linear, without bias (lm_head).

    The block's error is then x (W' - W)^T, computed from the weight difference: no float target
    is kept, so memory holds one chunk of outputs (tokens x vocab for lm_head), never all of them.
    The chunks' blocks are not used. `weight` is left as it was.
    """
    with torch.no_grad():
        if x_mean is None:
            x_mean = accumulate_mean_abs(chunks)
        total = sum(x.shape[0] for x, _, _ in chunks())
        rows = [weight[a:a + ROW_BLOCK] for a in range(0, weight.shape[0], ROW_BLOCK)]
        w_mean = sum(weight_magnitude([r], group_size) * r.shape[0] for r in rows) / weight.shape[0]
        delta = torch.empty_like(weight)

        def loss_of(s: torch.Tensor) -> float:
            weight_delta(weight, lambda w, _: fake_quantize(w * s, group_size).to(w.dtype) / s, delta)
            return output_error(chunks, delta, total)

        best = grid_search(x_mean, w_mean, grid, duo, weight.dtype, loss_of)
    return best


def output_error(chunks: Chunks, delta: torch.Tensor, total: int) -> float:
    """The weighted mean square of x delta^T over the chunks' tokens (uniform weights when a chunk has none)."""
    loss = 0.0
    for x, w_tok, _ in chunks():
        per_token = F.linear(x, delta).float().pow_(2).mean(-1)
        loss += (per_token * w_tok.to(per_token)).sum().item() if w_tok is not None else per_token.sum().item() / total
    return loss


def accumulate_mean_abs(chunks: Chunks) -> torch.Tensor:
    """`masked_mean_abs` summed over chunks (weighted when the chunks carry weights)."""
    acc, count = None, 0
    for x, w, _ in chunks():
        part = masked_mean_abs(x, weights=w) * (x.shape[0] if w is None else 1)
        acc = part if acc is None else acc + part
        count += x.shape[0]
    assert acc is not None, "no tokens"
    return acc / count if w is None else acc  # weighted chunks' weights already sum to 1 over all tokens


def fold_scales(prev: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Multiply the linears' input channels by s and divide the previous op's outputs by s."""
    with torch.no_grad():
        for lin in linears:
            lin.weight.data = lin.weight.data * s.to(lin.weight.dtype)
        if isinstance(prev, nn.Linear):
            prev.weight.data = prev.weight.data / s.to(prev.weight.dtype).unsqueeze(1)
            if prev.bias is not None:
                prev.bias.data = prev.bias.data / s.to(prev.bias.dtype)
        elif hasattr(prev, "weight"):  # RMSNorm / LayerNorm: y = w * norm(x) (+ b)
            prev.weight.data = prev.weight.data / s.to(prev.weight.dtype)
            if getattr(prev, "bias", None) is not None:
                prev.bias.data = prev.bias.data / s.to(prev.bias.dtype)
        else:
            raise TypeError(f"cannot fold scales into {type(prev).__name__}")


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    grid: int = 20,
    max_shrink: float = 0.5,
    tokens: int = 512,
    out_chunk: int = 256,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per (output channel, group) clipping threshold minimising the group's partial-output error.

    Returns max |w| allowed per [out, in/group]; the weights are later clamped to it.
    """
    out_features, in_features = weight.shape
    idx = clip_sample(x.shape[0], tokens).to(x.device)
    xs = x[idx].float().reshape(-1, in_features // group_size, group_size)  # [t, g, gs]
    w_tok = torch.full((idx.numel(),), 1.0 / idx.numel(), device=x.device) if weights is None else weights.to(x.device)[idx].float()
    w_tok = (w_tok / w_tok.sum()).reshape(1, -1, 1)
    best_all = []
    for start in range(0, out_features, out_chunk):
        w = weight[start:start + out_chunk].float().reshape(-1, in_features // group_size, group_size)  # [o, g, gs]
        org_max = w.abs().amax(dim=-1, keepdim=True)  # [o, g, 1]
        ref = torch.einsum("tgk,ogk->otg", xs, w)
        best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
        best_max = org_max.squeeze(-1).clone()
        for i in range(int(max_shrink * grid)):
            cur = org_max * (1 - i / grid)
            q = fake_quantize(torch.clamp(w, -cur, cur).reshape(w.shape[0], -1), group_size).reshape(w.shape)
            err = ((torch.einsum("tgk,ogk->otg", xs, q) - ref).pow(2) * w_tok).sum(dim=1)  # [o, g]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, cur.squeeze(-1), best_max)
        best_all.append(best_max)
    return torch.cat(best_all, dim=0)


def clip_sample(total: int, tokens: int = 512) -> torch.Tensor:
    """The evenly spaced tokens (at most `tokens` of `total`) that the clip search measures on."""
    step = max(1, total // tokens)
    return torch.arange(0, total, step)[:tokens]


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    w = weight.reshape(out_features, -1, group_size)
    m = max_val.to(weight.dtype).unsqueeze(-1)
    return torch.clamp(w, -m, m).reshape(out_features, in_features)
