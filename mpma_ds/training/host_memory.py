"""``keep_freed_host_memory``: let glibc keep the memory a CPU training step frees, for the next step to reuse.

glibc's malloc serves a large request with fresh ``mmap`` pages and hands them back to the kernel when the
block is freed (blocks above its mmap threshold, which adapts up to 32 MiB), and trims the top of its heap
when enough is free there. A CPU training step allocates and frees the same large tensors every step —
mpma_base's tied 50265 x 768 word-embedding gradient is 154 MB (twice: the embedding's and the MLM head's,
then their sum), the MAE decoder's (8, 16, 325, 325) attention scores 54 MB — so every step touches those
pages afresh and takes a minor page fault per 4 KiB: ~300 k faults (1.2 GB) per mpma_base step measured on
our CPU VM, costing from a third of its time to nothing measurable as the VM's free memory went
(benchmarks/bench_step.py, docs/model.md "Step cost (issue 15)"); open_clip's ViT-B/16 step, with no block
over 32 MiB, took none in the same process. With mmap off and trimming off, freed blocks stay in
the heap and the next step reuses them: the process keeps its peak resident set instead of returning it
between steps, which is what jemalloc and tcmalloc (the allocators PyTorch's CPU performance guide suggests)
do too.

``build_engine`` calls it on CPU-only machines; it changes nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
"""``mallopt`` parameter numbers (glibc ``malloc.h``)."""
GLIBC_STEADY_STATE = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
"""glibc's own settings once a process has freed a block of 32 MiB or more (default mmap count, the dynamic
mmap threshold at its cap, trim threshold twice that): what ``keep_freed_host_memory(False)`` restores."""
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
"""No block from ``mmap`` (so none is unmapped on free), no trimming of the heap below 2 GiB free."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # musl, macOS, Windows: their allocators are left as they are
    return libc


def keep_freed_host_memory(enable: bool = True) -> bool:
    """Keep freed host memory in this process (``enable``), or go back to glibc's steady-state settings and
    return what was kept to the kernel. Returns True when the setting was applied (glibc), False otherwise."""
    libc = _glibc()
    if libc is None:
        return False
    for param, value in (KEEP if enable else GLIBC_STEADY_STATE).items():
        if libc.mallopt(param, value) != 1:
            return False
    if not enable:
        libc.malloc_trim(0)
    return True
