"""The GPUs time predictions assume: one published card per memory size, with its peak dense bf16 tensor
throughput and its memory bandwidth, from the vendors' data sheets.

`plan` sizes cards by memory alone (24, 32, 40, 48, 80 GB); a time needs a particular chip, so
each size stands for the card listed here, and any other size for the listed card nearest in
memory. Predictions scale with these two numbers only, so a user with another chip can read
their own figure off as the ratio of its numbers to the ones printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1v_quant.units import GiB


@dataclass(frozen=True)
class CardSpec:
    name: str
    memory_gib: int
    bf16_tflops: float        # dense (no sparsity) bf16 tensor-core peak, fp32 accumulation
    bandwidth_gbs: float      # device memory bandwidth, GB/s (10^9 bytes)

    @property
    def flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9


CARDS = (
    CardSpec("RTX 4090", 24, 165.2, 1008.0),
    CardSpec("RTX 5090", 32, 209.5, 1792.0),
    CardSpec("A100 40GB SXM", 40, 312.0, 1555.0),
    CardSpec("L40S", 48, 362.05, 864.0),
    CardSpec("H100 SXM", 80, 989.4, 3352.0),
)


def card_for(memory_bytes: int) -> CardSpec:
    """The listed card whose memory is nearest `memory_bytes` (the smaller one on a tie)."""
    gib = memory_bytes / GiB
    return min(CARDS, key=lambda c: (abs(c.memory_gib - gib), c.memory_gib))
