"""What surrounds an `awq` run: the locks on its folders, and one sentence for an interruption or a
failed write that says what was kept (finished layers stay for `--resume`) and what was removed.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import re
import signal
from contextlib import ExitStack
from pathlib import Path

from safetensors import SafetensorError

from r1v_quant.errors import Interrupted, UserError
from r1v_quant.locks import locked
from r1v_quant.quant.workdir import check_apart
from r1v_quant.replace_guard import check_writable_parent

_OS_ERROR = re.compile(r"os error (\d+)")


def work_path(out: Path, work_dir: Path | None) -> Path:
    out = Path(out).absolute()
    return Path(work_dir).absolute() if work_dir else out.parent / f".{out.name}.awq-work"


def committed_layers(work: Path) -> int:
    """Layers recorded as finished in the work folder's state file (0 when there is none)."""
    try:
        return int(json.loads((Path(work) / "state.json").read_text())["done"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def kept_note(work: Path, total: int | None) -> str:
    """What of an interrupted run is left in its work folder, and how to continue it."""
    done = committed_layers(work)
    if not Path(work).exists():
        return "no work folder was left"
    if done == 0:
        from r1v_quant.quant.workdir import remove_work_folder

        if remove_work_folder(work):
            return f"no layer had finished, so the work folder {work} was removed"
        return f"no layer had finished; the work folder {work} was left as it was"
    if total is not None and done >= total:
        return f"all {done} layers are kept in {work}: rerun the same command with --resume to write the export"
    return (f"layers 0-{done - 1} are kept in {work}: rerun the same command with --resume to continue "
            f"from layer {done}")


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    m = _OS_ERROR.search(str(exc))
    return int(m.group(1)) if m else None


def _problem(code: int | None) -> str:
    return {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission was denied",
        errno.EPERM: "permission was denied",
        errno.ENOTDIR: "a path component is a file, not a folder",
    }.get(code, f"the write failed ({os.strerror(code) if code else 'unknown error'})")


def write_error(exc: BaseException, out: Path, work: Path, total: int | None) -> UserError:
    where = Path(exc.filename).parent if isinstance(exc, OSError) and exc.filename else Path(out).absolute().parent
    needs = ("free space there" if _errno(exc) in (errno.ENOSPC, errno.EDQUOT)
             else "make it writable" if _errno(exc) in (errno.EROFS, errno.EACCES, errno.EPERM) else "fix it")
    return UserError(f"writing to {where} failed: {_problem(_errno(exc))}; nothing was written to {out}, "
                     f"{kept_note(work, total)} ({needs} first).")


def guarded(run):
    """Wrap `quantize_checkpoint`: lock the export and work folders, and explain every way it can stop."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        out = Path(a["out"]).absolute()
        work = work_path(out, a.get("work_dir"))
        check_writable_parent(out)
        if a.get("work_dir"):
            check_writable_parent(work, "--work-dir")
        check_apart(work, out)  # before the locks make any folder
        with ExitStack() as held:
            try:
                held.enter_context(locked((out, "export folder"), (work, "work folder")))
                return run(*bound.args, **bound.kwargs)
            except Interrupted as e:
                name = signal.Signals(e.signum).name
                e.note = f"stopped by {name}; nothing was written to {out}; {kept_note(work, _total_layers(a['model']))}."
                raise
            except (OSError, SafetensorError) as e:
                raise write_error(e, out, work, _total_layers(a["model"])) from None

    return wrapper


def _total_layers(model) -> int | None:
    try:
        from r1v_quant.model.checkpoint import resolve_model
        from r1v_quant.model.config import load_config

        return load_config(resolve_model(model)).num_layers
    except (UserError, OSError):
        return None
