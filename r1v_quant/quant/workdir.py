"""The work folder of an `awq` run: per-layer results and the latest activations, so an interrupted run resumes."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from r1v_quant.errors import UserError

if TYPE_CHECKING:
    from r1v_quant.quant.activations import ActivationStore


@dataclass
class LayerReport:
    index: int
    rel_err_awq: float
    rel_err_rtn: float
    seconds: float
    peak_mem_mb: float
    alphas: dict[str, float] = field(default_factory=dict)


class WorkFolder:
    """Per-layer results and the latest activations of a run, so an interrupted run can resume."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:04d}.safetensors"

    def start(self, resume: bool) -> int:
        """The first layer still to do (0 for a fresh run)."""
        if resume and self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            if state.get("fingerprint") != self.fingerprint:
                raise UserError(f"{self.path} holds a run with other settings; remove it or drop --resume.")
            return int(state["done"]) + 1
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        return 0

    def finish_layer(self, i: int, tensors: dict[str, torch.Tensor], report: LayerReport, acts: ActivationStore) -> None:
        save_file(tensors, str(self.layer_file(i)))
        (self.path / f"layer-{i:04d}.json").write_text(json.dumps(asdict(report)))
        acts.save(self.path / "acts.safetensors")
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": i}))
        tmp.replace(self.state_file)

    def reports(self, count: int) -> list[LayerReport]:
        return [LayerReport(**json.loads((self.path / f"layer-{i:04d}.json").read_text())) for i in range(count)]
