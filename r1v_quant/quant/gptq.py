"""Error-compensating (GPTQ) rounding of one linear, at group scales and zero points fixed beforehand.

Round-to-nearest chooses each weight's code alone. GPTQ goes through the input channels one at a
time and spreads each column's rounding error over the columns not yet rounded, weighted by the
inverse of the inputs' second moment H = sum_t w_t x_t x_t^T, so that the linear's output on the
calibration inputs, rather than each weight, stays close to the float one.

What the AutoAWQ GEMM layout needs decides the variant: groups stay contiguous (no `g_idx`), so
each group's scale and zero point are computed from the contiguous group before any reordering,
and only then are the columns processed in descending diag(H) ("static" activation order). Codes
and zero points are integers 0..15, and the scales are exactly the float16 values stored, so the
weights the error feedback assumes are exactly the ones `awq_dequantize` reads back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from r1v_quant.errors import UserError
from r1v_quant.quant.primitives import minmax_params

BLOCK = 128  # columns rounded between two lazy updates of the remaining columns
DAMP_RETRIES = 6  # each retry multiplies the dampening by 10


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor     # uint8 [out, in], 0..15
    scales: torch.Tensor    # float32 [out, in / g], float16-exact
    zeros: torch.Tensor     # int32 [out, in / g], 0..15
    damp: float             # the dampening used, as a fraction of mean diag(H)
    retries: int            # how many times the Cholesky factorisation failed and dampening was raised
    dead: int               # input channels no calibration token activated


def accumulate_hessian(chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]], width: int,
                       device: torch.device | None = None) -> torch.Tensor:
    """H = sum_t w_t x_t x_t^T in float32 over chunks of (inputs [t, width], token weights [t] or None).

    Float32 whatever the inputs' dtype: the sum runs over up to 65536 tokens, and a bf16 sum
    would lose the small eigenvalues the error feedback divides by. None weights count 1 each.
    """
    h = None
    for x, w in chunks:
        xf = x.reshape(-1, width).float()
        xw = xf if w is None else xf * w.reshape(-1, 1).to(xf)
        part = xw.t() @ xf
        h = part if h is None else h.add_(part)
    if h is None:
        return torch.zeros(width, width, device=device)
    return h


def dead_channels(h: torch.Tensor) -> torch.Tensor:
    """Input channels whose every calibration input was zero (bool [in])."""
    return torch.diagonal(h) == 0


def static_order(h: torch.Tensor) -> torch.Tensor:
    """Columns by descending diag(H); ties keep their index order, so the order is reproducible."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def inverse_factor(h: torch.Tensor, damp: float, order: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H' + damp * mean diag(H') * I)^-1 (U^T U = the inverse), H' = H[order][:, order].

    Dead channels (zero diagonal) get a diagonal of 1 in H'. A factorisation that fails (H' not
    positive definite in float32) is retried with ten times the dampening; returns (U, the
    dampening used, the number of retries). `h` is not modified, and at most three matrices of its
    size are alive at once (h, and two of the factorisation's), which sets GPTQ's memory.
    """
    n = h.shape[0]
    order = torch.arange(n, device=h.device) if order is None else order
    diag = torch.diagonal(h)[order].clone()
    if not torch.isfinite(diag).all() or not torch.isfinite(h).all():
        raise UserError("a linear's calibration inputs contain NaN or infinite values.")
    diag[diag == 0] = 1.0
    mean_diag = diag.mean().item()
    for retry in range(DAMP_RETRIES + 1):
        d = damp * 10**retry
        hd = h[order.unsqueeze(1), order.unsqueeze(0)]
        hd.diagonal().copy_(diag + d * mean_diag)
        low, info = torch.linalg.cholesky_ex(hd)
        del hd
        if info.item() == 0:
            inv = torch.cholesky_inverse(low)
            del low
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if info.item() == 0:
                return upper, d, retry
    raise UserError(f"the inputs' second moment stayed singular at dampening {d:g}; the calibration set is too small "
                    "for --rounding gptq.")


def gptq_round(w: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, col_group: torch.Tensor,
               block: int = BLOCK) -> torch.Tensor:
    """Codes uint8 [out, in] of `w` (float32, columns already in processing order) with error feedback.

    `u` is the upper inverse factor in the same order, `scales`/`zeros` [out, groups] the fixed
    quantisation grid and `col_group` [in] each processed column's group. Rounds half to even,
    as round-to-nearest does, and clamps to 0..15, so a weight outside its group's (clipped)
    range takes the nearest end code and its clamping error is fed forward too.
    """
    w = w.clone()
    out_f, in_f = w.shape
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    zf = zeros.float()
    for a in range(0, in_f, block):
        b = min(a + block, in_f)
        wb = w[:, a:b].clone()
        err = torch.empty_like(wb)
        ub = u[a:b, a:b]
        for i in range(b - a):
            g = col_group[a + i]
            s, z = scales[:, g], zf[:, g]
            col = wb[:, i]
            q = torch.round(col / s).add_(z).clamp_(0, 15)
            codes[:, a + i] = q.to(torch.uint8)
            e = (col - (q - z) * s) / ub[i, i]
            err[:, i] = e
            # Spread this column's error over the block's later columns now, the rest once per block.
            wb[:, i + 1:] -= e.unsqueeze(1) * ub[i, i + 1:].unsqueeze(0)
        if b < in_f:
            w[:, b:] -= err @ u[a:b, b:]
    return codes


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01,
                  range_weight: torch.Tensor | None = None, block: int = BLOCK) -> GPTQResult:
    """GPTQ codes of a [out, in] weight against its inputs' second moment `h` [in, in], static order.

    Each contiguous group's scale and zero point come from `range_weight` (the clipped weight,
    when a clip search set the ranges; default `w`) with `minmax_params`, before any column is
    reordered. Dead input channels have their weights zeroed (their inputs never move the
    output) and their diagonal set to 1, so the factorisation stays defined.
    """
    h = h.float()
    dead = dead_channels(h)
    n_dead = int(dead.sum())
    w = w.float().clone()
    ranged = w if range_weight is None else range_weight.float().clone()
    if n_dead:
        w[:, dead] = 0.0
        ranged[:, dead] = 0.0
    scales, zeros = minmax_params(ranged, group_size)
    del ranged
    order = static_order(h)
    u, used, retries = inverse_factor(h, damp, order)
    col_group = order // (w.shape[1] // scales.shape[1])
    codes_perm = gptq_round(w[:, order], u, scales, zeros, col_group.tolist(), block)
    del u, w
    codes = torch.empty_like(codes_perm)
    codes[:, order] = codes_perm
    return GPTQResult(codes, scales, zeros, used, retries, n_dead)


def output_error(w_ref: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """trace((W' - W) H (W' - W)^T): the weighted squared output error of W' on the inputs whose moment is H."""
    d = (w_q.float() - w_ref.float())
    return float(((d @ h.float()) * d).sum())
