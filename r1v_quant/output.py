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


def check_free_space(folder: Path, needed_bytes: int) -> None:
    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # 5% headroom for indexes, configs and filesystem overhead.
    if free < needed_bytes * 1.05:
        raise UserError(
            f"{probe} has {free / 1e9:.2f} GB free but the output needs about {needed_bytes / 1e9:.2f} GB."
        )


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


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`, so a crash
    leaves either the old file or the new one, never half of one. The file gets the mode any file
    the user creates gets (0666 less the umask), or the mode of the file it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file private (0600); a report is meant to be read like any other file.
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
