"""Group-wise asymmetric integer quantisation and the AutoAWQ GEMM tensor format.

Every function here is pure and works on nn.Linear-layout weights `[out, in]` unless it says
otherwise; the AutoAWQ tensors are transposed (`[in, ...]`). The arithmetic is float32, and
scales are made float16-representable before any code is chosen, so that
`fake_quantize(w)` (what the AWQ search measures) and `awq_dequantize(**awq_tensors(w))`
(what a loader reads back) are the same numbers, bit for bit.
"""

from __future__ import annotations

import torch

from r1v_quant.errors import UserError

# Nibble i of a packed int32 holds output column 8c + AWQ_ORDER[i] (AutoAWQ's interleave,
# which its GEMM kernels unpack with shifts in this order).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32
# Keeps the step of a constant group positive, so codes and zero points stay defined.
MIN_SCALE = 1e-5
_FP16_MAX = torch.finfo(torch.float16).max


def check_group_size(in_features: int, group_size: int, name: str = "") -> None:
    """Raise UserError unless group_size is a positive divisor of in_features."""
    where = f"layer {name}: " if name else ""
    if group_size <= 0 or in_features % group_size:
        raise UserError(
            f"{where}group size {group_size} does not divide the {in_features} input channels "
            "(use a positive divisor such as 32, 64 or 128)."
        )


def check_awq_shape(out_features: int, in_features: int, group_size: int, name: str = "") -> None:
    """Raise UserError unless a linear of this shape can be stored in the AutoAWQ GEMM format."""
    check_group_size(in_features, group_size, name)
    if out_features % PACK:
        where = f"layer {name}: " if name else ""
        raise UserError(f"{where}{out_features} output channels are not a multiple of 8, which 4-bit packing needs.")


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> float32 [out, in / g, g]."""
    if w.dim() != 2:
        raise UserError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}.")
    check_group_size(w.shape[1], group_size)
    return w.float().reshape(w.shape[0], w.shape[1] // group_size, group_size)


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
    lo, hi = torch.aminmax(_grouped(w, group_size), dim=-1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scales = _round_up_to_fp16(((hi - lo) / maxq).clamp(min=MIN_SCALE))
    zeros = torch.round(-lo / scales).clamp(0, maxq).to(torch.int32)
    return scales, zeros


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Codes uint8 [out, in]: q = clamp(round(w / s) + z, 0, 2^bits - 1)."""
    maxq = 2**bits - 1
    g = _grouped(w, group_size)
    q = torch.round(g / scales.float().unsqueeze(-1)) + zeros.float().unsqueeze(-1)
    return q.clamp(0, maxq).to(torch.uint8).reshape(w.shape)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [out, in]: w' = (q - z) * s."""
    g = _grouped(q, group_size)
    return ((g - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """Round-to-nearest quantise then dequantise, float32 [out, in]: the weights a loader will see."""
    maxq = 2**bits - 1
    scales, zeros = minmax_params(w, group_size, bits)
    s, z = scales.unsqueeze(-1), zeros.float().unsqueeze(-1)
    # The same operations as quantize() then dequantize(), in place on one fresh buffer,
    # because the AWQ search calls this for every candidate scaling of every layer.
    q = (_grouped(w, group_size) / s).round_().add_(z).clamp_(0, maxq)
    return q.sub_(z).mul_(s).reshape(w.shape)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, cols] -> int32 [rows, cols / 8] in AutoAWQ's interleaved nibble order."""
    rows, cols = codes.shape
    if cols % PACK:
        raise UserError(f"cannot pack {cols} columns of 4-bit codes: not a multiple of 8.")
    c = codes.to(torch.int64).reshape(rows, cols // PACK, PACK)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64, device=codes.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= (c[..., col] & 0xF) << (4 * i)
    # Reinterpret the unsigned 32-bit pattern as int32 explicitly rather than rely on how
    # an out-of-range int64 -> int32 cast wraps.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] -> uint8 codes [rows, cols]; the inverse of pack_awq."""
    rows, n = packed.shape
    p = packed.to(torch.int32)
    out = torch.empty(rows, n, PACK, dtype=torch.uint8, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):
        out[..., col] = ((p >> (4 * i)) & 0xF).to(torch.uint8)
    return out.reshape(rows, n * PACK)


def awq_tensors(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest AutoAWQ GEMM tensors of a [out, in] weight.

    Returns qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales float16 [in/g, out].
    Scales are float16-exact before the codes are chosen, so the stored tensors dequantise to
    exactly `fake_quantize(w, group_size)`.
    """
    out_features, in_features = w.shape
    check_awq_shape(out_features, in_features, group_size)
    scales, zeros = minmax_params(w, group_size)
    q = quantize(w, scales, zeros, group_size)
    return {
        "qweight": pack_awq(q.t()),
        "qzeros": pack_awq(zeros.t()),
        "scales": scales.t().to(torch.float16).contiguous(),
    }


def awq_codes(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked codes uint8 [out, in] and zero points uint8 [out, in/g] in nn.Linear layout."""
    return unpack_awq(qweight).t().contiguous(), unpack_awq(qzeros).t().contiguous()


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [out, in] weight of AutoAWQ GEMM tensors (exact: 4-bit integer times float16 fits float32)."""
    q, z = awq_codes(qweight, qzeros)
    return dequantize(q, scales.t(), z, group_size)


def tinygemm_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[in/g, out, 2] table of (scale, offset) for PyTorch's int4pack kernels.

    Those kernels compute w = (q - 8) * scale + offset; with AWQ's integer zero point,
    (q - z) * s = (q - 8) * s + (8 - z) * s, so offset = (8 - z) * s.
    scales: [in/g, out] (AWQ layout); zeros: integer zero points [in/g, out].
    """
    s = scales.float()
    offset = (8 - zeros.float()) * s
    return torch.stack([s, offset], dim=-1).to(dtype).contiguous()


def int4pack_cpu(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] -> uint8 [out, in/2] for `torch.ops.aten._weight_int4pack_mm_for_cpu`.

    The CPU op takes one code per int32 and packs itself; its tile argument is unused.
    Needs out % 16 == 0.
    """
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def int4pack_cuda(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Codes [out, in] (on a CUDA device) -> int32 tensor-core layout for `torch.ops.aten._weight_int4pack_mm`.

    The CUDA op (torch >= 2.5) takes two codes per byte with the even input channel in the
    high nibble. Needs in % (inner_k_tiles * 16) == 0 and inner_k_tiles in {2, 4, 8}.
    """
    q = codes.to(torch.uint8)
    pairs = ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)


def int4pack(codes: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """Codes [out, in] -> the int4 matmul's weight layout for the codes' device (CPU or CUDA)."""
    return int4pack_cpu(codes) if codes.device.type == "cpu" else int4pack_cuda(codes, inner_k_tiles)


def awq_to_int4pack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, inner_k_tiles: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scale-and-offset table) for PyTorch's int4 matmul on the tensors' device.

    CPU tensors get the `_for_cpu` layout (inner_k_tiles unused), CUDA tensors the tensor-core one.
    """
    q, z = awq_codes(qweight, qzeros)
    table = tinygemm_scales_and_zeros(scales, z.t(), dtype)
    return int4pack(q, inner_k_tiles), table


# Rows probed at a time when recovering codes from a packed weight. Both packers lay out row
# blocks of this size one after another (CPU: blocks of 16, 32 or 64 rows; CUDA: tiles of 8).
_UNPACK_BLOCK_ROWS = 64
_code_sources: dict[tuple, torch.Tensor] = {}
_verified_rows: dict[tuple, int] = {}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit field of a packed tensor, uint8 [2 * bytes], low nibble of each byte first."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack((b & 0xF, b >> 4), dim=1).reshape(-1)


def _code_source(rows: int, in_features: int, device: torch.device, inner_k_tiles: int) -> torch.Tensor:
    """int64 [rows * in]: for code n * in + k of a [rows, in] block, the index of the nibble of
    int4pack(block) that holds it.

    Packing moves nibbles without looking at their values, so packing codes that spell out
    their own position (4 bits per probe) shows where every position goes, in any layout.
    """
    key = (device, rows, in_features, inner_k_tiles)
    source = _code_sources.get(key)
    if source is not None:
        return source
    n = rows * in_features
    position = torch.arange(n, device=device, dtype=torch.int64)
    order = torch.zeros(n, device=device, dtype=torch.int64)  # nibble j holds code order[j]
    for digit in range(((n - 1).bit_length() + 3) // 4):
        probe = ((position >> (4 * digit)) & 0xF).to(torch.int32).reshape(rows, in_features)
        nibbles = _nibbles(int4pack(probe, inner_k_tiles))
        if nibbles.numel() != n:
            raise RuntimeError(f"int4 packing of [{rows}, {in_features}] gave {nibbles.numel()} nibbles.")
        order |= nibbles.to(torch.int64) << (4 * digit)
    if not torch.equal(torch.sort(order).values, position):
        raise RuntimeError(f"int4 packing of [{rows}, {in_features}] is not a permutation of nibbles.")
    source = torch.empty_like(order)
    source[order] = position
    if rows <= _UNPACK_BLOCK_ROWS:  # small; whole-matrix tables are rebuilt when needed
        _code_sources[key] = source
    return source


def _unpack_rows(nibbles: torch.Tensor, out_features: int, in_features: int, device: torch.device,
                 inner_k_tiles: int, rows: int) -> torch.Tensor:
    """Codes [out, in] from nibbles laid out as consecutive packed blocks of `rows` rows (and a shorter last one)."""
    full = out_features // rows * rows
    parts = []
    if full:
        source = _code_source(rows, in_features, device, inner_k_tiles)
        blocks = nibbles[: full * in_features].view(full // rows, rows * in_features)
        parts.append(blocks.index_select(1, source).reshape(full, in_features))
    if full < out_features:
        tail = out_features - full
        source = _code_source(tail, in_features, device, inner_k_tiles)
        parts.append(nibbles[full * in_features:][source].reshape(tail, in_features))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def int4unpack(packed: torch.Tensor, out_features: int, in_features: int, inner_k_tiles: int = 8) -> torch.Tensor:
    """The inverse of `int4pack`: uint8 codes [out, in] of a packed weight, on its device.

    The layout is learnt from the packer itself (see `_code_source`) rather than restated, so it
    holds for every CPU capability and for the CUDA tensor-core layout. The first call for each
    (device, shape, tiles) re-packs its result and checks that it equals the input.
    """
    nibbles = _nibbles(packed)
    if nibbles.numel() != out_features * in_features:
        raise RuntimeError(f"packed weight holds {nibbles.numel()} 4-bit values, not {out_features} x {in_features}.")
    key = (packed.device, out_features, in_features, inner_k_tiles)
    rows = _verified_rows.get(key)
    if rows is not None:
        return _unpack_rows(nibbles, out_features, in_features, packed.device, inner_k_tiles, rows)
    # Row blocks first (small tables); if the packer does not lay rows out block by block,
    # learn the whole matrix's order instead.
    for rows in dict.fromkeys((min(_UNPACK_BLOCK_ROWS, out_features), out_features)):
        try:
            codes = _unpack_rows(nibbles, out_features, in_features, packed.device, inner_k_tiles, rows)
        except RuntimeError:
            continue
        if torch.equal(int4pack(codes, inner_k_tiles), packed):
            _verified_rows[key] = rows
            return codes
    raise RuntimeError(f"could not invert the int4 packing of a [{out_features}, {in_features}] weight.")
