"""keep_freed_host_memory: a large block freed and allocated again is served from the kept heap without page
faults (glibc); build_engine's CPU path relies on it (issue 15)."""

from __future__ import annotations

import ctypes
import resource

import pytest

from mpma_ds.training.host_memory import _glibc, keep_freed_host_memory

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mmapped, and unmapped on free, by default
PAGES = BLOCK // 4096


def _faults_of_block() -> int:
    """Minor page faults of malloc + touching every page + free of one BLOCK (malloc as torch's CPU allocator
    calls it; a tensor's own bookkeeping would add small allocations of its own between the rounds)."""
    libc = _glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(BLOCK)
    ctypes.memset(block, 1, BLOCK)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc() is None, reason="needs glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults():
    try:
        assert keep_freed_host_memory(True)
        faults = [_faults_of_block() for _ in range(4)]  # the heap grows once, then the block reuses its pages
        assert max(faults[1:]) < PAGES // 10, faults
        assert keep_freed_host_memory(False)  # back to glibc's settings; what was kept is returned
        faults = [_faults_of_block() for _ in range(2)]
        assert min(faults) > PAGES // 2, faults  # mmapped afresh every time: a fault per page
    finally:
        keep_freed_host_memory(False)
