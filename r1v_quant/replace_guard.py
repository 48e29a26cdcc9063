"""What `--force` may delete: an empty folder or an earlier r1v-quant export, and nothing that holds
the run's own inputs or another run's work.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1v_quant.errors import UserError
from r1v_quant.int4.format import read_quantization_config

# An export written by `awq` always holds these.
_EXPORT_MARKERS = ("r1v_quant_report.json", "config.json")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def looks_like_export(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in _EXPORT_MARKERS):
        return False
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(quant, dict):
        return False
    try:
        return read_quantization_config(quant).is_awq
    except UserError:
        return False


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_writable_parent(out: Path, flag: str = "--out") -> None:
    """A folder below a regular file cannot be created; say so, naming the flag, before any work."""
    for parent in Path(out).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {out} lies below {parent}, which is a file, not a folder.")
            return


def check_replaceable(out: Path, protected: dict[str, Path | None]) -> None:
    """Refuse to let `--force` delete `out` unless it is empty or an r1v-quant export.

    `protected` names the folders this run reads or another run writes (label -> path): `out`
    must not contain any of them, whatever it looks like.
    """
    out = Path(out).resolve()
    if not out.is_dir():
        return
    for label, path in protected.items():
        if path is None:
            continue
        path = Path(path).resolve()
        if _inside(path, out):
            raise UserError(f"--out {out} contains the {label} {path}; --force never deletes it, choose another folder.")
    for work in sorted(out.glob(".*.awq-work")):
        if (work / "state.json").is_file():
            raise UserError(f"--out {out} contains the work folder {work} of another run; --force never deletes it.")
    if any(out.iterdir()) and not looks_like_export(out):
        raise UserError(f"--out {out} is not an r1v-quant export (it holds {_listing(out)}); "
                        "--force only replaces an earlier export, so choose another folder.")


def check_export_conflicts(out: Path, writes: list[str], owned) -> None:
    """Before any work: refuse an earlier export at `out` holding a folder where the new export
    writes a file (`writes`, or a name `owned(name)` claims), naming it; `--force` never deletes it."""
    out = Path(out)
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if (entry.name in writes or owned(entry.name)) and entry.is_dir() and not entry.is_symlink():
            raise UserError(f"--out {out} holds a folder {entry.name} where the export writes a file; "
                            "move it away first (--force replaces only an export's own files).")
