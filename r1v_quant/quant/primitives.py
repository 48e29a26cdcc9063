"""Group-wise asymmetric integer quantisation: choosing scales, zero points and codes.

Every function here is pure and works on nn.Linear-layout weights `[out, in]` unless it says
otherwise; the AutoAWQ tensors (`r1v_quant.int4.format`) are transposed (`[in, ...]`). The arithmetic is float32, and
scales are made float16-representable before any code is chosen, so that
`fake_quantize(w)` (what the AWQ search measures) and `awq_dequantize(**awq_tensors(w))`
(what a loader reads back) are the same numbers, bit for bit.
"""

from __future__ import annotations

import torch

from r1v_quant.errors import UserError
from r1v_quant.int4.format import awq_dequantize, check_awq_shape, check_group_size, dequantize, grouped, to_awq

__all__ = [
    "MIN_SCALE", "awq_dequantize", "awq_tensors", "check_awq_shape", "check_group_size", "dequantize",
    "fake_quantize", "minmax_params", "quantize",
]

# Keeps the step of a constant group positive, so codes and zero points stay defined.
MIN_SCALE = 1e-5
_FP16_MAX = torch.finfo(torch.float16).max


def _round_up_to_fp16(s: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= s (s > 0), returned as float32.

    Rounding up rather than to nearest keeps 15 steps wide enough for the group's range,
    so the error bound |w - w'| <= s / 2 holds with the stored scale.
    """
    if not torch.isfinite(s).all():
        raise UserError("weights contain NaN or infinite values and cannot be quantised.")
    if (s > _FP16_MAX).any():
        raise UserError("weights span too wide a range for float16 quantisation scales.")
    h = s.to(torch.float16)
    # For positive float16 values, adding one to the bit pattern gives the next value up.
    bump = (h.float() < s).to(torch.int16)
    h = (h.view(torch.int16) + bump).view(torch.float16)
    return h.float()


def minmax_params(w: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group step and zero point: scales float32 [out, in/g] (float16-exact), zeros int32 [out, in/g].

    The range is widened to include 0, so the zero point never needs clamping and a group
    whose weights are all of one sign is still covered (AutoAWQ's clamp loses those).
    """
    maxq = 2**bits - 1
    lo, hi = torch.aminmax(grouped(w, group_size), dim=-1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scales = _round_up_to_fp16(((hi - lo) / maxq).clamp(min=MIN_SCALE))
    zeros = torch.round(-lo / scales).clamp(0, maxq).to(torch.int32)
    return scales, zeros


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Codes uint8 [out, in]: q = clamp(round(w / s) + z, 0, 2^bits - 1)."""
    maxq = 2**bits - 1
    g = grouped(w, group_size)
    q = torch.round(g / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    return q.clamp(0, maxq).to(torch.uint8).reshape(w.shape)


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Round-to-nearest quantise then dequantise, float32 [out, in]: the weights a loader will see."""
    maxq = 2**bits - 1
    scales, zeros = minmax_params(w, group_size, bits)
    s, z = scales.unsqueeze(-1), zeros.float().unsqueeze(-1)
    # The same operations as quantize() then dequantize(), in place on one fresh buffer,
    # because the AWQ search calls this for every candidate scaling of every layer.
    q = (grouped(w, group_size) / s).round_().add_(z).clamp_(0, maxq)
    return q.sub_(z).mul_(s).reshape(w.shape)


def awq_tensors(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest AutoAWQ GEMM tensors of a [out, in] weight.

    Returns qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales float16 [in/g, out].
    Scales are float16-exact before the codes are chosen, so the stored tensors dequantise to
    exactly `fake_quantize(w, group_size)`.
    """
    out_features, in_features = w.shape
    check_awq_shape(out_features, in_features, group_size)
    scales, zeros = minmax_params(w, group_size)
    return to_awq(quantize(w, scales, zeros, group_size), zeros, scales)
