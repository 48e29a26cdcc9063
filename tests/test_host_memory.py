"""Freed heap memory goes back to the OS between layers (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from r1v_quant.quant.host_memory import _libc, release_freed_host_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None, reason="glibc only")
def test_freed_heap_blocks_are_returned_after_a_trim():
    libc = _libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 * 1024                                   # under the mmap threshold: served from the heap
    blocks = [libc.malloc(block) for _ in range(3000)]  # about 190 MiB
    for b in blocks:
        ctypes.memset(b, 1, block)
    for b in blocks[:-1]:                               # the last block pins the heap's top
        libc.free(b)
    before = _rss_mib()
    assert release_freed_host_memory()
    after = _rss_mib()
    libc.free(blocks[-1])
    assert before - after > 100
