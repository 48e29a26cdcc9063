"""The dtype the layer forwards and search matmuls of `awq` run in.

Losses and statistics are accumulated in float32 whatever the compute dtype (see awq.py). bf16
would have to keep held-out KL(source || export) within 2% of the float32 search to become the
default. It does on the stress checkpoint (`make-tiny`: image KL 0.0152 vs 0.0285, text 0.0650 vs
0.0709) but not on r1v-mini (image KL 0.0115 vs 0.0095, 21% worse; text 0.0400 vs 0.0399), so
float32 stays the default on every device and bf16 is opt-in. Where it is used, it is fast only
on CPUs with bf16 matmul units (AMX, AVX-512 BF16): elsewhere torch's bf16 matmul is far slower
than float32.
"""

from __future__ import annotations

import torch

from r1v_quant.errors import UserError

CHOICES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


def cpu_bf16_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {"amx_bf16", "avx512_bf16"} & set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def faster_cpu_dtype() -> tuple[torch.dtype, str]:
    """bf16 where the CPU has bf16 matmul units (AMX or AVX-512 BF16) and torch dispatches to them, else float32.

    Decided by the CPU's features, not by timing, so the same machine always makes the same export.
    """
    flags = cpu_bf16_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if flags and capability not in ("DEFAULT", "AVX2"):
        return torch.bfloat16, f"this CPU has {' and '.join(sorted(flags))}: bf16 matmuls outrun float32"
    return torch.float32, f"no bf16 matmul units in use on this CPU ({capability} kernels): float32 is faster"


def choose_compute_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why) for `--compute-dtype` on `device`."""
    if requested not in CHOICES:
        raise UserError(f"--compute-dtype {requested} is not one of auto, float32, bfloat16.")
    if CHOICES[requested] is not None:
        why = "asked for"
        if CHOICES[requested] == torch.bfloat16 and device.type == "cpu":
            why += "; " + faster_cpu_dtype()[1]
        return CHOICES[requested], why
    return torch.float32, "bf16 search failed the accuracy criterion (held-out KL within 2% of float32) on r1v-mini"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
