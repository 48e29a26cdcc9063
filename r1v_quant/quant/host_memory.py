"""Handing freed heap memory back to the operating system between decoder layers.

glibc serves allocations under its mmap threshold from the heap, and that threshold rises
(up to 32 MiB) as large blocks are freed, so a layer's many chunk-sized tensors end up in
heap pages that stay mapped after the layer is done. Without a trim the next layer's peak
sits on top of the last one's leftovers: at the 38B widths a 2-layer run peaked 0.6 GiB
above a 1-layer run of the same calibration size (benchmarks/calib_memory.py). A fixed low
mmap threshold cures the same thing but costs a fifth more time in page faults; one trim
per layer costs nothing measurable.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # musl has none


def release_freed_host_memory() -> bool:
    """Return free heap pages to the OS (glibc's ``malloc_trim``); False where there is no such call."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
