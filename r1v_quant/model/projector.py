"""Pixel shuffle and the `mlp1` projector from vision width to LLM width."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, scale: float, version: str) -> torch.Tensor:
    """InternVL's space-to-depth: [n, w, h, c] -> [n, h*s, w*s, c/s^2] (v2 transposes back)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def make_projector(vision_width: int, llm_width: int, downsample_ratio: float) -> nn.Sequential:
    width = int(vision_width / downsample_ratio**2)
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, llm_width),
        nn.GELU(),
        nn.Linear(llm_width, llm_width),
    )


def tokens_from_patches(patches: torch.Tensor, scale: float, version: str) -> torch.Tensor:
    """Vision hidden states without the class token [n, g*g, c] -> LLM-bound tokens [n, (g*s)^2, c/s^2]."""
    n, tokens, c = patches.shape
    side = int(tokens**0.5)
    grid = patches.reshape(n, side, side, c)
    shuffled = pixel_shuffle(grid, scale, version)
    return shuffled.reshape(n, -1, shuffled.shape[-1])
