"""Calibration activations between decoder layers: kept per sample on the CPU, spilled to disk past a threshold."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from r1v_quant.output import write_atomic


class ActivationStore:
    """Per-sample hidden states [1, T, D] kept on the CPU, written to disk past a byte threshold."""

    def __init__(self, spill_dir: Path | None = None, threshold_bytes: int = 8 * 1024**3, tag: str = "acts"):
        self.spill_dir, self.threshold, self.tag = spill_dir, threshold_bytes, tag
        self.items: list[torch.Tensor | Path] = []
        self.ram_bytes = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self.spill_dir is not None and self.ram_bytes + size > self.threshold:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{self.tag}-{len(self.items):06d}.safetensors"
            save_file({"x": t}, str(path))
            self.items.append(path)
        else:
            self.items.append(t)
            self.ram_bytes += size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return load_file(str(item))["x"] if isinstance(item, Path) else item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tokens(self) -> int:
        return sum(self[i].shape[1] for i in range(len(self)))

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.items, self.ram_bytes = [], 0

    def save(self, path: Path) -> None:
        tensors = {f"s{i}": self[i] for i in range(len(self))}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))

    def load(self, path: Path) -> None:
        data = load_file(str(path))
        self.clear()
        for i in range(len(data)):
            self.append(data[f"s{i}"])
