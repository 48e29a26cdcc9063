"""The AutoAWQ GEMM format: how 4-bit codes are packed, the tensors a quantised linear stores, and
the `quantization_config` that describes them.

A quantised linear of `in` inputs, `out` outputs and group size `g` stores (transposed against
nn.Linear's `[out, in]`):

    qweight  int32    [in, out / 8]      eight 4-bit codes per int32, in AWQ_ORDER
    qzeros   int32    [in / g, out / 8]  the integer zero points, packed the same way
    scales   float16  [in / g, out]

and its weight is w = (q - z) * s, group by group along the input channels. A group size of -1
means one group per row (g = in), as in AutoAWQ and vLLM; `check_group_size` resolves it.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from r1v_quant.errors import UserError

# Nibble i of a packed int32 holds output column 8c + AWQ_ORDER[i] (AutoAWQ's interleave,
# which its GEMM kernels unpack with shifts in this order).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32
BITS = 4
AWQ_LEAVES = ("qweight", "qzeros", "scales")
AWQ_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}
AWQ_DTYPE_NAMES = {leaf: str(dtype).removeprefix("torch.") for leaf, dtype in AWQ_DTYPES.items()}
# quant_method values that name this format.
AWQ_METHODS = ("awq", "awq_marlin", "auto_awq")
DEFAULT_GROUP_SIZE = 128  # AutoAWQ's, when a config names none
# vLLM pads its ParallelLMHead to a multiple of this many rows (DEFAULT_VOCAB_PADDING_SIZE) and copies a
# 4-bit lm_head's tensors whole into it, so a quantised lm_head's vocabulary must be such a multiple.
VLLM_VOCAB_PADDING = 64
# The names each quantization_config field goes by (AutoAWQ's own quant_config uses the second ones).
_ALIASES = {
    "quant_method": ("quant_method",),
    "bits": ("bits", "w_bit"),
    "group_size": ("group_size", "q_group_size"),
    "zero_point": ("zero_point",),
    "version": ("version",),
    "lm_head": ("lm_head",),
    "modules_to_not_convert": ("modules_to_not_convert",),
}


# ---------------------------------------------------------------------------------------------
# The 4-bit lm_head
#
# A 4-bit lm_head needs both: a head of its own (a tied one is embed_tokens, which neither AWQ's scale
# folding nor vLLM's AWQ configs quantise), and a vocabulary that is a multiple of VLLM_VOCAB_PADDING.


def head_is_tied(llm_config: dict) -> bool:
    """Whether the language model's lm_head is embed_tokens (`tie_word_embeddings`)."""
    return bool(llm_config.get("tie_word_embeddings", False))


def head_rows_fit_vllm(vocab_size: int) -> bool:
    """Whether vLLM can place a 4-bit lm_head of this many rows in its padded ParallelLMHead."""
    return vocab_size % VLLM_VOCAB_PADDING == 0


# ---------------------------------------------------------------------------------------------
# Groups and shapes


def group_width(group_size: int, in_features: int) -> int:
    """Input channels per group: -1 means the whole row."""
    return in_features if group_size == -1 else group_size


def check_group_size(in_features: int, group_size: int, name: str = "") -> int:
    """The group size in input channels (-1: one group per row); UserError unless it divides in_features."""
    where = f"layer {name}: " if name else ""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise UserError(f"{where}group size {group_size!r} is not an integer.")
    width = group_width(group_size, in_features)
    if width <= 0 or in_features % width:
        raise UserError(
            f"{where}group size {group_size} does not divide the {in_features} input channels "
            "(use a positive divisor such as 32, 64 or 128, or -1 for one group per row)."
        )
    return int(width)


def check_awq_shape(out_features: int, in_features: int, group_size: int, name: str = "") -> int:
    """The group size in input channels; UserError unless a linear of this shape fits the format."""
    group = check_group_size(in_features, group_size, name)
    if out_features % PACK:
        where = f"layer {name}: " if name else ""
        raise UserError(f"{where}{out_features} output channels are not a multiple of 8, which 4-bit packing needs.")
    return group


def awq_shapes(out_features: int, in_features: int, group_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The stored tensors of one linear: leaf -> (shape, torch dtype name)."""
    groups = in_features // check_awq_shape(out_features, in_features, group_size)
    shapes = {
        "qweight": (in_features, out_features // PACK),
        "qzeros": (groups, out_features // PACK),
        "scales": (groups, out_features),
    }
    return {leaf: (shapes[leaf], AWQ_DTYPE_NAMES[leaf]) for leaf in AWQ_LEAVES}


def check_awq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                      group_size: int, name: str = "") -> tuple[int, int]:
    """(in_features, out_features) of a linear's stored tensors; UserError on any shape or dtype off the format."""
    where = f"layer {name}: " if name else ""
    if qweight.dim() != 2:
        raise UserError(f"{where}qweight must be 2-D [in, out/8], got shape {tuple(qweight.shape)}.")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
    expected = awq_shapes(out_features, in_features, check_group_size(in_features, group_size, name))
    for leaf, t in zip(AWQ_LEAVES, (qweight, qzeros, scales)):
        shape, dtype = expected[leaf][0], AWQ_DTYPES[leaf]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise UserError(f"{where}{leaf} is {t.dtype} {tuple(t.shape)} but group size {group_size} needs {dtype} {shape}.")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise UserError(f"{where}bias has shape {tuple(bias.shape)}, expected ({out_features},).")
    return in_features, out_features


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> float32 [out, in / g, g]."""
    if w.dim() != 2:
        raise UserError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}.")
    g = check_group_size(w.shape[1], group_size)
    return w.float().reshape(w.shape[0], w.shape[1] // g, g)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [out, in]: w' = (q - z) * s."""
    g = grouped(q, group_size)
    return ((g - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(q.shape)


# ---------------------------------------------------------------------------------------------
# Packing


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


def to_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors from codes [out, in], zero points [out, in/g] and float16-exact scales [out, in/g]."""
    return {
        "qweight": pack_awq(codes.t()),
        "qzeros": pack_awq(zeros.t()),
        "scales": scales.t().to(torch.float16).contiguous(),
    }


def awq_codes(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked codes uint8 [out, in] and zero points uint8 [out, in/g] in nn.Linear layout."""
    return unpack_awq(qweight).t().contiguous(), unpack_awq(qzeros).t().contiguous()


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [out, in] weight of the stored tensors (exact: 4-bit integer times float16 fits float32)."""
    q, z = awq_codes(qweight, qzeros)
    return dequantize(q, scales.t(), z, group_size)


# ---------------------------------------------------------------------------------------------
# quantization_config


def quantization_config(group_size: int, modules_to_not_convert: Iterable[str], lm_head: bool = False) -> dict:
    """What an export's config.json says about its quantised linears.

    `"lm_head": true` (written only when lm_head is quantised, as AutoAWQ never writes it) tells
    vLLM's AWQ configs to build the output head from qweight/qzeros/scales too.
    """
    out: dict[str, Any] = {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    if lm_head:
        out["lm_head"] = True
    out["modules_to_not_convert"] = list(modules_to_not_convert)
    return out


def quant_field(qc: dict, key: str, default: Any = None) -> Any:
    """A quantization_config field under any of its known names."""
    for alias in _ALIASES[key]:
        if alias in qc:
            return qc[alias]
    return default


@dataclass(frozen=True)
class AWQConfig:
    """A quantization_config, read once: the fields as given, under their canonical names."""

    quant_method: str
    bits: int | None
    group_size: int
    zero_point: bool
    version: str
    lm_head: bool
    modules_to_not_convert: list[str] | None
    given: frozenset[str] = frozenset()   # the fields the config states (canonical names); the rest are defaults

    @property
    def is_awq(self) -> bool:
        return self.quant_method in AWQ_METHODS

    def stated(self, key: str) -> Any:
        """A field as the config states it, None when the config leaves it to the default."""
        return getattr(self, key) if key in self.given else None

    def problems(self) -> list[str]:
        """What keeps this config from describing the 4-bit, zero-point GEMM AWQ that r1v-quant writes and
        vLLM's AWQ configs load (empty when nothing does). vLLM reads bits, group size, zero point and
        version from the config itself, so a field left to AutoAWQ's default counts as missing here."""
        out = []
        if not self.is_awq:
            out.append(f"quant_method is {self.stated('quant_method')!r}, not one of {', '.join(map(repr, AWQ_METHODS))}")
        if self.bits != BITS:
            out.append(f"bits is {self.bits!r}, not {BITS}")
        group = self.stated("group_size")
        if group is None or (group <= 0 and group != -1):
            out.append(f"group_size is {group!r}, not a positive integer or -1")
        if self.stated("zero_point") is not True:
            out.append(f"zero_point is {self.stated('zero_point')!r}, not true (AWQ GEMM tensors carry zero points)")
        if str(self.stated("version")).lower() != "gemm":
            out.append(f"version is {self.stated('version')!r}, not 'gemm'")
        return out

    def check_loadable(self, where: str) -> None:
        """UserError unless this is the 4-bit, zero-point, GEMM-layout AWQ that r1v-quant runs."""
        if not self.is_awq or self.bits != BITS or not self.zero_point:
            raise UserError(
                f"{where}: quantization_config {self.quant_method!r} with {self.bits} bits is not supported; "
                "r1v-quant loads 4-bit AWQ (zero point) exports."
            )
        if self.version.lower() != "gemm":
            raise UserError(f"{where}: AWQ version {self.version!r} is not supported; r1v-quant loads the GEMM layout.")


def _integer(qc: dict, key: str, where: str, default: int | None) -> int | None:
    value = quant_field(qc, key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: quantization_config {key} is {value!r}, not an integer.")
    return value


def _is_name_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(e, str) for e in value)


def read_quantization_config(qc: Any, where: str = "config.json") -> AWQConfig:
    """The one reader of a quantization_config; UserError when it is not a JSON object or its
    bits or group size are not integers."""
    if not isinstance(qc, dict):
        raise UserError(f"{where}: quantization_config is {type(qc).__name__} {qc!r:.60}, not a JSON object.")
    not_convert = quant_field(qc, "modules_to_not_convert")
    return AWQConfig(
        quant_method=str(quant_field(qc, "quant_method", "")).lower(),
        bits=_integer(qc, "bits", where, None),
        group_size=_integer(qc, "group_size", where, DEFAULT_GROUP_SIZE),
        zero_point=bool(quant_field(qc, "zero_point", True)),
        version=str(quant_field(qc, "version", "gemm")),
        lm_head=bool(quant_field(qc, "lm_head", False)),
        modules_to_not_convert=list(not_convert) if _is_name_list(not_convert) else None,
        given=frozenset(key for key, aliases in _ALIASES.items() if any(a in qc for a in aliases)),
    )
