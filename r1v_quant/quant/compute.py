"""The dtype the layer forwards and search matmuls of `awq` run in.

Losses and statistics are accumulated in float32 whatever the compute dtype (see awq.py). bf16
is the CUDA default: it meets the accuracy criterion (held-out KL within 2% of the float32 search,
measured on the stress checkpoint and on r1v-mini; figures in BENCHMARKS.md) and runs on the
tensor cores. On a CPU the faster of the two is measured: bf16 matmuls are several times slower
than float32 where the CPU lacks AVX-512 bf16 / AMX, and faster where it has them.
"""

from __future__ import annotations

import time

import torch

from r1v_quant.errors import UserError

CHOICES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


def _matmul_seconds(dtype: torch.dtype, n: int = 512, k: int = 2048, reps: int = 3) -> float:
    a = torch.randn(n, k).to(dtype)
    b = torch.randn(k, k).to(dtype)
    a @ b  # the first call pays for kernel selection
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return time.perf_counter() - start


def faster_cpu_dtype() -> tuple[torch.dtype, str]:
    """The faster of float32 and bf16 for a CPU matmul of search size, by a short (~0.1 s) probe."""
    f32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    dtype = torch.bfloat16 if bf16 < f32 else torch.float32
    return dtype, f"measured: bf16 matmuls run at {f32 / bf16:.2g}x the speed of float32 on this CPU"


def choose_compute_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why) for `--compute-dtype` on `device`."""
    if requested not in CHOICES:
        raise UserError(f"--compute-dtype {requested} is not one of auto, float32, bfloat16.")
    if CHOICES[requested] is not None:
        return CHOICES[requested], "asked for"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.bfloat16, "CUDA: bf16 tensor cores, float32 accumulation of losses and statistics"
    return faster_cpu_dtype()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
