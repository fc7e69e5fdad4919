"""The command line's process keeps the memory it frees, for its next batch.

A pass allocates activation-sized tensors for every layer of every batch (6 MB per layer
output of a demo batch of 64 digits) and frees them when the batch is done. glibc's
malloc, left to itself, serves blocks above a threshold with fresh mappings and hands a
heap top above twice that threshold back to the system, so each batch faults the same
pages in again, zero-filled by the kernel; on a virtual machine that backs guest memory
lazily each fault also exits to the host. Keeping freed blocks made a default demo merge
22% faster on our 2-core VM (statistics pass 10 -> 6 s; see benchmarks/README.md). PyTorch's
CPU tuning guide recommends swapping in jemalloc or tcmalloc for the same reason; a
library cannot preload an allocator, but it can set glibc's two thresholds.

Only ``hfrepair``'s own command sets them: a process that imports hfrepair keeps its
allocator as its owner configured it. Every pass ends by handing what it freed back to
the system (a merge's evaluation passes, after the last of them), so the resident set
still shrinks between passes.
"""

from __future__ import annotations

import ctypes

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap and are reused (glibc's own ceiling for its
# dynamic threshold); larger ones are still mapped and unmapped as before.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_GLIBC = _glibc()


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks rather than return them; False where the C library
    is not glibc (macOS, musl, Windows), which is left as it is."""
    if _GLIBC is None:
        return False
    return bool(_GLIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_GLIBC.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Return what a finished pass freed to the system (glibc's ``malloc_trim``): kept
    within a pass for the next batch, released between passes, so that the resident set
    follows what a merge holds, and each pass's peak is its own, not an earlier pass's."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
