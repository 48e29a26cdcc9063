"""Output files and folders that appear whole or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
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
def staged_dir(out: Path, force: bool = False, owned: Callable[[str], bool] | None = None,
               kept: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on any failure it vanishes.

    Replacing an earlier folder (`force`) replaces only its own files: those the new folder also
    writes, and those `owned(name)` claims (an earlier export's shards, say). Everything else in it
    (a `.git`, the user's notes) moves into the new folder untouched; `kept` receives those names.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        users = None
        if out.exists():
            if not force and any(out.iterdir()):
                raise UserError(f"--out {out} appeared while writing; pass --force to replace it.")
            users = _users_entries(out, {p.name for p in tmp.iterdir()}, owned or (lambda name: False))
        _share(tmp)
        if users is not None:
            _swap(out, tmp, users)
            if kept is not None:
                kept[:] = users
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"the disk holding {out.parent} is full; nothing was written to {out}.") from None
        raise UserError(f"writing {out} failed ({e.strerror or e}); nothing was written.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _users_entries(out: Path, writes: set[str], owned: Callable[[str], bool]) -> list[str]:
    """The entries of `out` that are not the replaced folder's own, refusing a folder where a file goes."""
    users = []
    for entry in sorted(out.iterdir()):
        if entry.name in writes or owned(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                raise UserError(f"--out {out} holds a folder {entry.name} where the export writes a file; "
                                "move it away first (--force replaces only an export's own files).")
        else:
            users.append(entry.name)
    return users


def _swap(out: Path, new: Path, users: list[str]) -> None:
    """Put `new` in place of `out`, carrying the user's entries of `out` over. Signals wait until the
    few renames are done, so an interruption never strands the user's files in the old folder."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    with _signals_deferred():
        os.rename(out, old)  # onto the empty folder just made
        try:
            os.rename(new, out)
        except OSError:
            os.rename(old, out)
            raise
        stranded = []
        for name in users:
            try:
                os.rename(old / name, out / name)
            except OSError:
                stranded.append(name)
    if stranded:
        raise UserError(f"the new export is in {out}, but {', '.join(stranded)} could not be moved over from the "
                        f"earlier one; it is kept in {old}.")
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first that came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode the user's umask gives a file they create: 0644 under umask 022, 0600 under 077."""
    return 0o666 & ~_umask()


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
