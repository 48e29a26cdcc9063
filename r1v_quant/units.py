"""Sizes and dtypes: byte units as people write them, and the bytes per element of each dtype name."""

from __future__ import annotations

import math
import re

from r1v_quant.errors import UserError

GiB = 1024**3

# safetensors dtype codes and sizes; torch dtype names map onto them.
ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32", "int8": "I8", "uint8": "U8"}
ST_TO_TORCH = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I32": "int32", "I8": "int8", "U8": "uint8",
               "I64": "int64", "F64": "float64", "BOOL": "bool", "I16": "int16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2"}
KV_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "auto": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT = {"": GiB, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
         "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
# vLLM's integer suffixes: lower case decimal, upper case binary.
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a torch dtype name or a safetensors code."""
    code = TORCH_TO_ST.get(dtype, dtype)
    if code not in ST_ITEMSIZE:
        raise UserError(f"unknown tensor dtype {dtype!r}.")
    return ST_ITEMSIZE[code]


def spec_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * dtype_bytes(dtype)


def human_bytes(n: int) -> str:
    """Bytes in binary units: '28.48 GiB', '2.84 MiB'."""
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,d} B"


# Far above any card's or host's memory, far below where byte counts stop being exact.
MAX_SIZE = 2**50


def parse_size(text: str, flag: str = "--gpu-mem entry", minimum: int = GiB, maximum: int = MAX_SIZE) -> int:
    """'24GiB' -> bytes; GB/MB are decimal, GiB/MiB binary; a bare number is GiB (a card's nominal size)."""
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"{flag} {text!r} is not a size such as 24GiB, 30GB or 81559MiB.")
    value = float(m.group(1)) * _UNIT[(m.group(2) or "").lower()]
    if value > maximum:
        raise UserError(f"{flag} {text!r} is over {human_bytes(maximum)}, more than any device or host holds; "
                        "check the number and its unit.")
    if value < minimum:
        raise UserError(f"{flag} {text!r} is under {human_bytes(minimum)}; write the unit, e.g. 24GiB.")
    return int(value)


def human_int(text: str) -> int:
    """An integer as vLLM reads one: '2048', '8k' (8000) or '8K' (8192)."""
    text = text.strip()
    suffix = text[-1:] if text[-1:] in _DECIMAL or text[-1:] in _BINARY else ""
    number = text[: len(text) - len(suffix)]
    if suffix in _BINARY:
        return int(number) * _BINARY[suffix]
    if suffix:
        return int(float(number) * _DECIMAL[suffix])
    return int(number)
