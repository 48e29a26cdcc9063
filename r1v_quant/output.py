"""Output files and folders that appear whole or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from r1v_quant.errors import UserError


def check_out_dir(out: Path, force: bool, source: Path | None = None) -> None:
    out = Path(out).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise UserError(f"--out {out} lies inside the source checkpoint {src}; choose a folder outside it.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder.")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; pass --force to replace it.")


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on any failure it vanishes."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"the disk holding {out.parent} is full; nothing was written to {out}.") from None
        raise UserError(f"writing {out} failed ({e.strerror or e}); nothing was written.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not force and any(out.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"--out {out} appeared while writing; pass --force to replace it.")
        shutil.rmtree(out)
    _share(tmp)
    tmp.rename(out)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _share(folder: Path) -> None:
    # mkdtemp creates a private folder; an export is meant to be read by others. Files keep the
    # modes they were written with: widening them would publish a private side file.
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        if f.is_dir():
            f.chmod(0o777 & ~umask)


def write_atomic(path: Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`, so a crash
    leaves either the old file or the new one, never half of one. The file gets the mode any file
    the user creates gets (0666 less the umask), or the mode of the file it replaces. With
    `durable`, the bytes reach the disk before the rename (what a later step trusts after a power
    loss). The folder must exist: a mistyped path is not made into new folders."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file private (0600); a report is meant to be read like any other file.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        if durable:
            fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str, durable: bool = False) -> Path:
    """`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_report_path(path: Path | None, option: str) -> None:
    """Refuse, before any work, a report path that could not be written at the end: a folder, a
    path below a file or a missing folder, or a folder this process cannot write to."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; name a file to write.")
    parent = path.absolute().parent
    if not parent.is_dir():
        above = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise UserError(f"{option} {path} lies below {above}, which is a file, not a folder.")
        raise UserError(f"{option} {path}: the folder {parent} does not exist; create it first.")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise UserError(f"{option} {path} cannot be written: {parent} is not writable "
                        f"({e.strerror or e}).") from None
    os.close(fd)
    os.unlink(probe)


def write_report(path: Path, write: Callable[[Path], None], option: str) -> Path:
    """Write a report atomically. Should that fail after the work (the disk filled, the folder
    went away), the report goes to a temporary file instead, and the one-sentence UserError
    names both, so nothing computed is lost."""
    path = Path(path)
    try:
        return write_atomic(path, write)
    except OSError as e:
        reason = e.strerror or str(e)
    suffix = path.suffix or ".txt"
    try:
        fd, spare = tempfile.mkstemp(prefix=f"r1v-quant-{path.stem}-", suffix=suffix)
        os.close(fd)
        write(Path(spare))
        os.chmod(spare, 0o666 & ~_umask())
    except OSError as e:
        raise UserError(f"{option} {path} could not be written ({reason}), nor a copy in the temporary folder "
                        f"({e.strerror or e}).") from None
    raise UserError(f"{option} {path} could not be written ({reason}); the report was saved to {spare} instead.")


def write_text_report(path: Path, text: str, option: str) -> Path:
    """`write_report` for UTF-8 text."""
    return write_report(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), option)
