"""The InternViT vision encoder of Skywork-R1V, with the checkpoint's own module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from r1v_quant.model.config import VisionSettings


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32: bf16 variance loses too much precision over 3200 channels.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(norm_type: str, width: int, eps: float) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm(width, eps)
    if norm_type == "layer_norm":
        return nn.LayerNorm(width, eps=eps)
    raise ValueError(f"unknown vision norm_type {norm_type!r}")


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        d = cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, d))

    def positions(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.position_embedding
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        if (rows, cols) != (self.grid, self.grid):
            grid = patch_pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls_pos.to(dtype), patch_pos.to(dtype)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        rows, cols = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.positions(rows, cols, patches.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = make_norm(cfg.norm_type, d, cfg.layer_norm_eps)
            self.k_norm = make_norm(cfg.norm_type, d, cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            # InternViT normalises over the full width, before the heads are split.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = make_norm(cfg.norm_type, d, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(d))
        self.norm2 = make_norm(cfg.norm_type, d, cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden states after layer `select_layer`, where index 0 is the embedding output."""
        depth = len(self.encoder.layers)
        stop = select_layer if select_layer >= 0 else depth + 1 + select_layer
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x
