"""Token chunks for one decoder layer's AWQ pass: how large, and where the stored tensors live.

Every per-token computation of a layer runs over chunks of at most `chunk_tokens` tokens, so the
memory a layer needs is bounded by the budget, not by the calibration size. The decision is one
pure function, `plan_chunks`, so that a memory model can ask it the same question `awq` does.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch

CLIP_TOKENS = 512  # tokens the clip search measures on, sampled once per layer
ACT_BETWEEN_LAYERS = 4  # bytes per value: activations travel between layers in float32

# Kept free on a GPU for the CUDA context, the allocator's fragmentation and the kernels' workspaces.
CUDA_HEADROOM = 2 * 1024**3
CUDA_HEADROOM_SHARE = 0.10
# Kept free on a CPU-only machine for the OS, the loaded front and the activations between layers.
CPU_HEADROOM = 4 * 1024**3
MIN_CHUNK = 16
# Hidden-width tensors stored over all tokens while a layer is searched: the inputs of the q, o and
# gate groups, the float layer outputs, the next layer's inputs and one group's search target.
STORED_HIDDEN = 6
# Intermediate-width tensors alive per chunk token inside an MLP forward of the scale search
# (gate, up, act(gate) * up, and the output being compared), plus hidden-width temporaries.
CHUNK_INTERMEDIATE = 4
CHUNK_HIDDEN = 8


@dataclass(frozen=True)
class ChunkPlan:
    chunk_tokens: int          # tokens per chunk of every per-token computation
    stored_on_device: bool     # the stored hidden-width tensors live on the device (else host memory)
    keep_down_inputs: bool     # down_proj's inputs are stored (else recomputed per chunk from the gate inputs)


def plan_chunks(tokens: int, hidden: int, intermediate: int, layer_weight_bytes: int, budget_bytes: int,
                act_bytes: int = 4) -> ChunkPlan:
    """Chunk size and placement for one layer of `tokens` calibration tokens within `budget_bytes`.

    Resident on the device during a layer, in the activation dtype (`act_bytes` per value):
    the layer's weights twice (the searches keep a copy to restore); one chunk of C tokens x
    intermediate width x 4, plus C x hidden x 8; the stored tensors, 6 x tokens x hidden, when
    they fit, else in host memory and streamed chunk by chunk; and down_proj's inputs,
    tokens x intermediate, only when they fit beside all of that, else recomputed per chunk.
    A quarter of what the weights leave goes to the chunk, so the stored tensors keep the rest.
    Not counted: one sample's attention forward (its own length, at most --seq-len tokens, with
    SDPA's memory-efficient kernels) and the clip search's fixed 512-token sample.
    """
    free = max(budget_bytes - 2 * layer_weight_bytes, 0)
    per_token = chunk_token_bytes(hidden, intermediate, act_bytes)
    chunk = max(MIN_CHUNK, min(tokens, (free // 4) // max(per_token, 1)))
    left = free - chunk * per_token
    stored, down = stored_bytes(tokens, hidden, intermediate, act_bytes)
    on_device = stored <= left
    keep_down = on_device and stored + down <= left
    return ChunkPlan(int(chunk), on_device, keep_down)


def plan_head_chunks(tokens: int, hidden: int, vocab: int, head_weight_bytes: int, budget_bytes: int,
                     act_bytes: int = 4) -> ChunkPlan:
    """Chunk size and placement for lm_head's AWQ pass (quant/head.py) within `budget_bytes`.

    Resident on the device: lm_head's weight twice (itself, and the difference a candidate's
    quantisation makes to it, from which the objective is computed); one chunk of C tokens'
    logit errors (`head_chunk_token_bytes`); and the final norm's outputs, tokens x hidden, when
    they fit, else in host memory and streamed. As for a layer, a quarter of what the weights
    leave goes to the chunk.
    """
    free = max(budget_bytes - 2 * head_weight_bytes, 0)
    per_token = head_chunk_token_bytes(hidden, vocab, act_bytes)
    chunk = max(MIN_CHUNK, min(tokens, (free // 4) // max(per_token, 1)))
    return ChunkPlan(int(chunk), tokens * hidden * act_bytes <= free - chunk * per_token, False)


def head_chunk_token_bytes(hidden: int, vocab: int, act_bytes: int) -> int:
    """Bytes one chunk token holds alive in lm_head's objective: its logit error in the activation
    dtype and in float32 (squared in place), plus hidden-width temporaries."""
    return vocab * (act_bytes + 4) + CHUNK_HIDDEN * hidden * act_bytes


def chunk_token_bytes(hidden: int, intermediate: int, act_bytes: int) -> int:
    """Bytes one chunk token holds alive inside an MLP forward of the scale search."""
    return (CHUNK_INTERMEDIATE * intermediate + CHUNK_HIDDEN * hidden) * act_bytes


def stored_bytes(tokens: int, hidden: int, intermediate: int, act_bytes: int) -> tuple[int, int]:
    """The stored hidden-width tensors over all tokens, and down_proj's inputs, in bytes."""
    return STORED_HIDDEN * tokens * hidden * act_bytes, tokens * intermediate * act_bytes


def device_bytes(plan: ChunkPlan, tokens: int, hidden: int, intermediate: int, layer_weight_bytes: int,
                 act_bytes: int) -> dict[str, int]:
    """What `plan` keeps on the device during a layer, by part (the terms `plan_chunks` budgets for)."""
    stored, down = stored_bytes(tokens, hidden, intermediate, act_bytes)
    return {"weights": 2 * layer_weight_bytes,
            "chunk": plan.chunk_tokens * chunk_token_bytes(hidden, intermediate, act_bytes),
            "stored": stored if plan.stored_on_device else 0,
            "down inputs": down if plan.keep_down_inputs else 0}


def gptq_bytes(plan: ChunkPlan, tokens: int, hidden: int, intermediate: int, layer_weight_bytes: int, act_bytes: int,
               widest_in: int, widest_rows: int) -> dict[str, int]:
    """What `--rounding gptq` keeps on the device after the searches, by part, at its largest (down_proj's turn).

    The layer's weights once (the searches' copies are gone) and the float outputs when the plan
    stores them there; then the larger of two moments: accumulating the second moment H, float32
    [in, in] of the widest-input linear, beside one chunk's MLP forward and a float32 weighted copy
    of its inputs; or factorising it, three matrices of H's size (H and two of the factorisation's)
    beside two float32 copies of the weight (`gptq.gptq_quantize`).
    """
    h = widest_in * widest_in * 4
    accumulate = h + plan.chunk_tokens * (chunk_token_bytes(hidden, intermediate, act_bytes) + 8 * widest_in)
    factor = 3 * h + 2 * widest_rows * widest_in * 4
    return {"weights": layer_weight_bytes, "float outputs": tokens * hidden * act_bytes if plan.stored_on_device else 0,
            "second moments": max(accumulate, factor)}


def headroom_budget(free_bytes: int) -> int:
    """A GPU's free memory less max(2 GiB, 10%): what `awq` may use there by default."""
    return max(int(free_bytes - max(CUDA_HEADROOM, CUDA_HEADROOM_SHARE * free_bytes)), 0)


def default_budget(device: torch.device) -> int:
    """The device memory `awq` may use when `--max-device-memory` is not given.

    CUDA: the GPU's free memory less max(2 GiB, 10%). CPU: the host's available memory less 4 GiB,
    so the working set stays within what the machine has.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return headroom_budget(free)
    return max(available_host_bytes() - CPU_HEADROOM, 1024**3)


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory of this process so far: allocated on a GPU, resident on the host."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def token_bounds(total: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `chunk` tokens covering `total` tokens."""
    return [(a, min(a + chunk, total)) for a in range(0, total, chunk)]


def sample_bounds(lengths: list[int], chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of whole samples, packed up to `chunk` tokens (a longer sample stands alone)."""
    out, start, end = [], 0, 0
    for n in lengths:
        if end > start and end + n - start > chunk:
            out.append((start, end))
            start = end
        end += n
    if end > start:
        out.append((start, end))
    return out


class TokenStore:
    """A [tokens, width] tensor filled chunk by chunk, kept on the device or in (pinned) host memory."""

    def __init__(self, tokens: int, width: int, dtype: torch.dtype, device: torch.device, on_device: bool):
        self.device = device
        place = device if on_device or device.type == "cpu" else torch.device("cpu")
        pin = place.type == "cpu" and device.type == "cuda"
        self.data = torch.empty(tokens, width, dtype=dtype, device=place, pin_memory=pin)
        self.filled = 0

    def append(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        # Blocking: rows() and divide_() read host copies right after.
        self.data[self.filled:self.filled + n].copy_(rows.reshape(n, -1))
        self.filled += n

    def chunk(self, start: int, end: int) -> torch.Tensor:
        return self.data[start:end].to(self.device, non_blocking=True)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx.to(self.data.device)].to(self.device)

    def divide_(self, scales: torch.Tensor, chunk: int) -> None:
        """Divide every row by per-channel scales, chunk by chunk (no full-size temporary)."""
        for a, b in token_bounds(self.data.shape[0], chunk):
            part = self.data[a:b]
            part.copy_((part.to(self.device) / scales.to(self.device, part.dtype)).to(part.device))
