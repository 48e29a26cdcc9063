"""The work folder of an `awq` run: per-layer results and the latest activations, so an interrupted run resumes.

A layer is committed in two steps: its files are written under names of their own (the
activations after layer i go to `acts-000i`, never over the previous layer's), then one
`state.json` is replaced atomically, naming every file the run depends on with its sha256.
A process that dies anywhere leaves either the previous state, whose files are all still
there, or the new one. `--resume` checks every named file against its digest, and removes
files the state does not name (the remains of an interrupted commit).

The folder is the run's own: it carries a marker file, and a run only ever deletes the entries
it writes. A folder holding anything else, or holding the run's inputs or its export, is
refused before any work, so `--work-dir` can never delete a user's files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from r1v_quant.errors import UserError
from r1v_quant.model.identity import changed_file
from r1v_quant.output import fsync, write_text_atomic

if TYPE_CHECKING:
    from r1v_quant.quant.activations import ActivationStore

# 3: the state records the source checkpoint's identity, and the folder carries MARKER
STATE_VERSION = 3
MASKS_NAME = "image_masks.safetensors"
MARKER = ".r1v-quant-work"
SPILL = "spill"
# Every name a run writes into its work folder, and the temporary names of output.write_atomic.
_OWN = re.compile(r"^(state\.json|layer-\d{4}\.(safetensors|json)|acts-\d{4}\.safetensors|lm_head\.(safetensors|json)|"
                  + re.escape(MASKS_NAME) + ")$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_SPILLED = re.compile(r"^[a-z]+-\d{6}\.safetensors$")


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
    gptq_damp: dict[str, float] = field(default_factory=dict)  # GPTQ: linears whose dampening had to be raised
    gptq_dead: dict[str, int] = field(default_factory=dict)    # GPTQ: linears' input channels no token activated
    sensitivity: dict[str, float] = field(default_factory=dict)  # per linear group, with AWQSettings.sensitivity


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _own(entry: Path) -> bool:
    """Whether a run writes this entry of its work folder (spilled activations included)."""
    name = entry.name
    if name == MARKER:
        return entry.is_file() and not entry.is_symlink()
    if name == SPILL:
        return entry.is_dir() and not entry.is_symlink() and all(
            (_SPILLED.match(e.name) or _temp_of(e.name, _SPILLED)) and e.is_file() for e in entry.iterdir())
    return bool(_OWN.match(name) or _temp_of(name, _OWN)) and entry.is_file() and not entry.is_symlink()


def _temp_of(name: str, pattern: re.Pattern) -> bool:
    m = _TEMP.match(name)
    return bool(m and pattern.match(m.group("name")))


def foreign_entries(folder: Path) -> list[str]:
    """Names in `folder` that no r1v-quant run wrote there (all of them when it has no marker)."""
    entries = sorted(Path(folder).iterdir())
    if not (Path(folder) / MARKER).is_file():
        return [e.name for e in entries]
    return [e.name for e in entries if not _own(e)]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_apart(work: Path, out: Path) -> None:
    """The work folder and the export folder must not be one, nor one inside the other."""
    work, out = Path(work).absolute().resolve(), Path(out).absolute().resolve()
    if _inside(work, out) or _inside(out, work):
        where = "is" if work == out else "lies inside" if _inside(work, out) else "holds"
        raise UserError(f"the work folder {work} {where} the export folder --out {out}; "
                        "pass another --work-dir (or none: the default lies beside --out).")


def check_work_folder(work: Path, out: Path, inputs: dict[str, Path]) -> None:
    """Refuse, before any work, a work folder the run could not later remove without deleting
    what is not its own: the export folder or one holding or inside it, a folder holding any of
    `inputs` (label -> path: the source checkpoint, the calibration data), or an existing folder
    that is neither empty nor an r1v-quant work folder holding only its own files."""
    work = Path(work).absolute().resolve()
    check_apart(work, out)
    for label, path in inputs.items():
        path = Path(path).absolute().resolve()
        if _inside(path, work):
            raise UserError(f"the work folder {work} {'is' if path == work else 'holds'} the {label} {path}, "
                            "and a work folder is deleted after the run; pass another --work-dir.")
    if work.exists() and not work.is_dir():
        raise UserError(f"the work folder {work} is a file, not a folder; pass another --work-dir.")
    if work.is_dir():
        foreign = foreign_entries(work)
        if foreign and not (work / MARKER).exists() and (work / "state.json").is_file():
            raise UserError(f"the work folder {work} holds no marker of this version of r1v-quant (an older run's, "
                            "or another program's); remove it yourself or pass another --work-dir.")
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"the work folder {work} is not empty and is not an r1v-quant work folder (it holds {shown}), "
                            "and a work folder is deleted after the run; pass a new or empty --work-dir.")


def remove_work_folder(folder: Path) -> bool:
    """Delete the entries a run wrote into `folder`, then the folder if that left it empty.
    Anything else stays (and so does the folder); returns whether the folder is gone."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / MARKER).is_file():
        return not folder.exists()
    for entry in folder.iterdir():
        if entry.name != MARKER and _own(entry):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
    if any(e.name != MARKER for e in folder.iterdir()):
        return False
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()
    return True


class WorkFolder:
    """Per-layer results and the latest activations of a run, so an interrupted run can resume."""

    def __init__(self, path: Path, fingerprint: str, source: dict | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.source = source  # the source checkpoint's model_identity: a resumed run must find it unchanged
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
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"the work folder {self.path} is a file, not a folder; pass another --work-dir.")
        foreign = foreign_entries(self.path) if self.path.is_dir() else []
        if foreign:  # check_work_folder said so before any work; this is the last line of defence
            raise UserError(f"the work folder {self.path} holds {foreign[0]}, which this version of r1v-quant did not "
                            "write; pass a new or empty --work-dir.")
        if resume and self.state_file.is_file():
            self._load_state()
            return self.done + 1
        if self.path.is_dir():
            remove_work_folder(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).write_text("r1v-quant work folder: per-layer results of an awq run, for --resume\n")
        self.done, self.files = -1, {}
        return 0

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            raise UserError(f"{self.state_file} is unreadable; remove {self.path} or drop --resume.") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("files"), dict):
            raise UserError(f"{self.path} was written by another version of r1v-quant; remove it or drop --resume.")
        if self.source is not None and state.get("source") != self.source:
            changed = changed_file(state.get("source") or {}, self.source)
            what = f"the source checkpoint's {changed}" if changed else "the source checkpoint"
            raise UserError(f"{what} changed since the run in {self.path} began, so its finished layers would mix "
                            "two versions of the model; remove the work folder or drop --resume.")
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.path} holds a run with other settings; remove it or drop --resume.")
        for name, digest in state["files"].items():
            path = self.path / name
            if not path.is_file():
                raise UserError(f"{self.path} lacks {name}, which its state file names; remove the folder or drop --resume.")
            if file_digest(path) != digest:
                raise UserError(f"{path} does not match the checksum its state file records; "
                                f"remove {self.path} or drop --resume.")
        self.done, self.files = int(state["done"]), dict(state["files"])
        for stray in self.path.iterdir():
            if stray.name not in (self.state_file.name, MARKER) and stray.name not in self.files and _own(stray):
                stray.unlink() if stray.is_file() else shutil.rmtree(stray, ignore_errors=True)

    def _write_state(self, done: int, files: dict[str, str]) -> None:
        write_text_atomic(self.state_file, json.dumps({"version": STATE_VERSION, "fingerprint": self.fingerprint,
                                                       "source": self.source, "done": done, "files": files},
                                                      indent=1, sort_keys=True), durable=True)
        self.done, self.files = done, files

    def _record(self, files: dict[str, str], *paths: Path) -> dict[str, str]:
        out = dict(files)
        for p in paths:
            fsync(p)
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
