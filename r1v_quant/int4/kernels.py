"""PyTorch's int4 matmul layouts (`_convert_weight_to_int4pack*`), from and back to AutoAWQ codes.

`aten._weight_int4pack_mm` (CUDA tensor cores) and `aten._weight_int4pack_mm_for_cpu` take the
codes in layouts of their own and a (scale, offset) table in the activation dtype; everything
here converts between those and the AutoAWQ GEMM tensors of `int4.format`.
"""

from __future__ import annotations

import torch

from r1v_quant.int4.format import unpack_awq


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


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, table: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ the packed weight's transpose -> [n, out], with the op for x's device."""
    cpu = x.device.type == "cpu"
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu if cpu else torch.ops.aten._weight_int4pack_mm
    return mm(x, packed, group_size, table)


def awq_scale_table(qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 matmul's (scale, offset) table [in/g, out, 2] of AutoAWQ qzeros and scales."""
    return tinygemm_scales_and_zeros(scales, unpack_awq(qzeros), dtype)


def awq_to_int4pack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, inner_k_tiles: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scale-and-offset table) for PyTorch's int4 matmul on the tensors' device.

    CPU tensors get the `_for_cpu` layout (inner_k_tiles unused), CUDA tensors the tensor-core one.
    """
    return int4pack(unpack_awq(qweight).t(), inner_k_tiles), awq_scale_table(qzeros, scales, dtype)


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
