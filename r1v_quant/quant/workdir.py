"""The work folder of an `awq` run: per-layer results and the latest activations, so an interrupted run resumes.

A layer is committed in two steps: its files are written under names of their own (the
activations after layer i go to `acts-000i`, never over the previous layer's), then one
`state.json` is replaced atomically, naming every file the run depends on with its sha256.
A process that dies anywhere leaves either the previous state, whose files are all still
there, or the new one. `--resume` checks every named file against its digest, and removes
files the state does not name (the remains of an interrupted commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from r1v_quant.errors import UserError

if TYPE_CHECKING:
    from r1v_quant.quant.activations import ActivationStore

STATE_VERSION = 2
MASKS_NAME = "image_masks.safetensors"


def _crash_point(name: str) -> None:
    """Named points of a layer commit; tests replace this to kill the process exactly there."""


@dataclass
class LayerReport:
    index: int
    rel_err_awq: float
    rel_err_rtn: float
    seconds: float
    peak_mem_mb: float
    alphas: dict[str, float] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)  # per linear group, with AWQSettings.sensitivity


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkFolder:
    """Per-layer results and the latest activations of a run, so an interrupted run can resume."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done = -1
        self.files: dict[str, str] = {}  # file name -> sha256, as the state file records them

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:04d}.safetensors"

    def acts_file(self, i: int) -> Path:
        """Activations after layer i (the inputs of layer i + 1)."""
        return self.path / f"acts-{i:04d}.safetensors"

    @property
    def masks_file(self) -> Path:
        return self.path / MASKS_NAME

    def start(self, resume: bool) -> int:
        """The first layer still to do (0 for a fresh run)."""
        if resume and self.state_file.is_file():
            self._load_state()
            return self.done + 1
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.done, self.files = -1, {}
        return 0

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            raise UserError(f"{self.state_file} is unreadable; remove {self.path} or drop --resume.") from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.path} holds a run with other settings; remove it or drop --resume.")
        if state.get("version") != STATE_VERSION or not isinstance(state.get("files"), dict):
            raise UserError(f"{self.path} was written by another version of r1v-quant; remove it or drop --resume.")
        for name, digest in state["files"].items():
            path = self.path / name
            if not path.is_file():
                raise UserError(f"{self.path} lacks {name}, which its state file names; remove the folder or drop --resume.")
            if file_digest(path) != digest:
                raise UserError(f"{path} does not match the checksum its state file records; "
                                f"remove {self.path} or drop --resume.")
        self.done, self.files = int(state["done"]), dict(state["files"])
        for stray in self.path.iterdir():
            if stray.name != self.state_file.name and stray.name not in self.files:
                stray.unlink() if stray.is_file() else shutil.rmtree(stray, ignore_errors=True)

    def _write_state(self, done: int, files: dict[str, str]) -> None:
        tmp = self.state_file.with_name("state.json.tmp")
        tmp.write_text(json.dumps({"version": STATE_VERSION, "fingerprint": self.fingerprint, "done": done,
                                   "files": files}, indent=1, sort_keys=True))
        _fsync(tmp)
        tmp.replace(self.state_file)
        self.done, self.files = done, files

    def _record(self, files: dict[str, str], *paths: Path) -> dict[str, str]:
        out = dict(files)
        for p in paths:
            _fsync(p)
            out[p.name] = file_digest(p)
        return out

    def save_masks(self, masks: list[torch.Tensor]) -> None:
        save_file({f"s{i}": m for i, m in enumerate(masks)}, str(self.masks_file))
        self._write_state(-1, self._record({}, self.masks_file))

    def first_acts_file(self) -> Path | None:
        """Where the inputs of the first layer still to do were saved (None for layer 0's)."""
        return self.acts_file(self.done) if self.done >= 0 else None

    def finish_layer(self, i: int, tensors: dict[str, torch.Tensor], report: LayerReport, acts: ActivationStore) -> None:
        written = [self.layer_file(i), self.path / f"layer-{i:04d}.json", self.acts_file(i)]
        try:
            save_file(tensors, str(written[0]))
            written[1].write_text(json.dumps(asdict(report)))
            _crash_point("layer-files-written")
            acts.save(written[2])
            _crash_point("acts-written")
            files = {k: v for k, v in self.files.items() if not k.startswith("acts-")}
            self._write_state(i, self._record(files, *written))
        except BaseException:
            # The previous state and its files are intact; only this layer's partial files go.
            if self.done < i:
                for p in written:
                    p.unlink(missing_ok=True)
            raise
        _crash_point("state-written")
        if i > 0:
            self.acts_file(i - 1).unlink(missing_ok=True)

    @property
    def head_file(self) -> Path:
        return self.path / "lm_head.safetensors"

    def head_done(self) -> bool:
        return self.head_file.name in self.files

    def finish_head(self, tensors: dict[str, torch.Tensor], report: LayerReport) -> None:
        """Commit lm_head's results after the last layer, as a layer is committed; its inputs are then no longer needed."""
        written = [self.head_file, self.path / "lm_head.json"]
        try:
            save_file(tensors, str(written[0]))
            written[1].write_text(json.dumps(asdict(report)))
            files = {k: v for k, v in self.files.items() if not k.startswith("acts-")}
            self._write_state(self.done, self._record(files, *written))
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        for stale in self.path.glob("acts-*.safetensors"):
            stale.unlink(missing_ok=True)

    def head_report(self) -> LayerReport:
        return LayerReport(**json.loads((self.path / "lm_head.json").read_text()))

    def reports(self, count: int) -> list[LayerReport]:
        return [LayerReport(**json.loads((self.path / f"layer-{i:04d}.json").read_text())) for i in range(count)]
