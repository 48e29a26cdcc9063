"""Exclusive locks on the folders a run writes, so two runs never share a work or staging folder.

A lock is an `flock` on a small file beside the folder, holding the owner's PID. The kernel
drops an `flock` when its process dies, however it dies, so a lock left by a killed run is
simply taken over; the PID in the file is only there to name the holder.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from r1v_quant.errors import UserError


def lock_path(folder: Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


class FolderLock:
    """An exclusive, non-blocking lock on `folder` (the folder itself need not exist yet)."""

    def __init__(self, folder: Path, what: str):
        self.folder = Path(folder).absolute()
        self.what = what
        self.path = lock_path(self.folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._lock_once()
            # A holder that released between our open and our flock has unlinked the file we locked.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            # A full disk takes the file's creation but not its PID: leave no empty lock behind.
            self.release()
            raise

    def _lock_once(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = _read_pid(self.path)
            who = f"PID {holder}" if holder else "another process"
            raise UserError(f"another r1v-quant run ({who}) is using the {self.what} {self.folder}; "
                            "wait for it to finish or stop it first.") from None
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so no waiting run locks a file about to vanish.
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def locked(*folders: tuple[Path, str]) -> Iterator[None]:
    """Hold the locks of several folders, taken in the order given and released in reverse."""
    with ExitStack() as stack:
        seen: set[Path] = set()
        for folder, what in folders:
            key = Path(folder).absolute()
            if key in seen:
                continue
            seen.add(key)
            stack.enter_context(FolderLock(folder, what))
        yield
