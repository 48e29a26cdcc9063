"""A reference `_C::cpu_gemm_wna16` for vLLM on CPUs whose vLLM build lacks it. For CPU checks only.

vLLM's CPU wheels ship one native library per x86 ISA level. The AVX-512 builds contain the
4-bit weight-only GEMM `_C::cpu_gemm_wna16` that `CPUWNA16LinearKernel` calls for AWQ/GPTQ
linears; the AVX2 build (the one vLLM loads on a CPU without AVX-512, like some of the
machines this project is tested on) does not, so every 4-bit checkpoint fails at its first
forward pass there. This module substitutes for that missing AVX-512 kernel with a plain
PyTorch implementation (dequantise, then matmul), so that vLLM's own loader, weight
conversion and engine can be checked against r1v-quant's exports on such machines. It is
slow and meant for small test checkpoints: it is NOT a serving kernel, and it is never used
where vLLM's own op exists (`register()` only adds it when the op is absent).

The tensors it receives were re-laid by vLLM before the first call:
`AutoAWQMarlinLinearMethod` turns the AutoAWQ tensors into the GPTQ-like layout (standard
nibble order, qweight packed along the input dimension, zero points `[N/8, G]`), then
`CPUWNA16LinearKernel.process_weights_after_loading` transposes the zero points to
`[G, N/8]` and `_process_gptq_weights_w4a16` repacks the weight along the output dimension in
blocks of 16 output channels. So, with K inputs, N outputs, G groups and 4-bit values:
- `q_weight` int32 `[N/16, K*2]`: row b, 64-bit word k (int32 pair 2k, 2k+1) holds the 16
  codes of input k for outputs 16b..16b+15; nibble i of int32 j is output 16b + 8j + i;
- `scales` `[G, N]` in the activation dtype;
- `zeros` int32 `[G, N/8]` or None: nibble i of column c is the zero point of output 8c + i;
  without zero points the code is offset by 8 (GPTQ's symmetric uint4b8);
- `output` `[M, N]` is written in place; `bias` `[N]` is added in float32.
As in vLLM's kernel, the dequantised weight `(q - z) * s` is computed in float32, rounded to
the activation dtype, and the product accumulates in float32.
"""

from __future__ import annotations

import torch

OP_NAMESPACE = "_C"
OP_NAME = "cpu_gemm_wna16"
OP_SCHEMA = (
    "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a!) output, Tensor scales, "
    "Tensor? zeros, Tensor? bias, int pack_factor, str isa_hint) -> ()"
)
BITS = 4
PACK_FACTOR = 32 // BITS
BLOCK_N = 16  # output channels per block in vLLM's CPU layout

_library = None  # the torch.library.Library holding our registration; kept alive while loaded


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., c] -> int32 [..., c * 8]: value i of packed column c is bits 4i..4i+3 of it."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(*packed.shape[:-1], packed.shape[-1] * PACK_FACTOR)


def unpack_weight(q_weight: torch.Tensor) -> torch.Tensor:
    """vLLM's blocked CPU weight `[N/16, K*2]` -> codes int32 `[K, N]` (0..15)."""
    if q_weight.dim() != 2 or q_weight.dtype != torch.int32:
        raise ValueError(f"q_weight must be 2-D int32, got {q_weight.dtype} {tuple(q_weight.shape)}")
    n_blocks, row = q_weight.shape
    words_per_input = BLOCK_N // PACK_FACTOR  # 2 int32 per input channel and block
    k = row // words_per_input
    codes = _nibbles(q_weight.reshape(n_blocks, k, words_per_input))  # [N/16, K, 16]
    return codes.permute(1, 0, 2).reshape(k, n_blocks * BLOCK_N)


def unpack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points `[G, N/8]` -> int32 `[G, N]`."""
    return _nibbles(zeros)


def dequantize(q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The `[K, N]` weight vLLM's kernel multiplies by, in `dtype` (default: the scales' dtype)."""
    codes = unpack_weight(q_weight).float()
    k, n = codes.shape
    groups = scales.shape[0]
    if scales.shape[1] != n or k % groups:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a weight of {k} inputs x {n} outputs")
    group_size = k // groups
    offset = 8.0 if zeros is None else unpack_zeros(zeros).float().repeat_interleave(group_size, dim=0)
    w = (codes - offset) * scales.float().repeat_interleave(group_size, dim=0)
    return w.to(dtype or scales.dtype)


def cpu_gemm_wna16_reference(input: torch.Tensor, q_weight: torch.Tensor, output: torch.Tensor,
                             scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
                             pack_factor: int, isa_hint: str) -> None:
    """output[M, N] = input[M, K] @ dequantize(q_weight) (+ bias). `isa_hint` is accepted and ignored."""
    if pack_factor != PACK_FACTOR:
        raise ValueError(f"only 4-bit weights (pack_factor 8) are supported, got {pack_factor}")
    w = dequantize(q_weight, scales, zeros, dtype=input.dtype)
    out = input.float() @ w.float()
    if bias is not None:
        out += bias.float()
    output.copy_(out.to(output.dtype))


def native_op_present() -> bool:
    """True when vLLM's own library (loaded first, as vLLM would) provides the op."""
    import vllm._custom_ops  # noqa: F401  (makes vLLM load the native library for this CPU)

    return hasattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME)


def register() -> bool:
    """Register the reference op when vLLM's library lacks it; return True if this call registered it.

    Call it in the process that runs the model, before the engine starts (with
    `VLLM_ENABLE_V1_MULTIPROCESSING=0` and `distributed_executor_backend="uni"` that is the
    calling process). It never shadows an op vLLM provides.
    """
    global _library
    if _library is not None:
        return False
    if native_op_present():
        return False
    lib = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    lib.define(OP_SCHEMA)
    lib.impl(OP_NAME, cpu_gemm_wna16_reference, "CPU")
    # Shape-only twin for tracing: the op writes into `output` and returns nothing.
    torch.library.register_fake(f"{OP_NAMESPACE}::{OP_NAME}", lambda *args, **kwargs: None, lib=lib)
    _library = lib
    return True


def registered() -> bool:
    """True when this module's reference op is the one in use."""
    return _library is not None
