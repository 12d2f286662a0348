"""The process heap's policy (glibc only; elsewhere these do nothing).

CLIP inference allocates and frees the same large blocks every batch: by default glibc hands them
back to the OS and page-faults them in again (~10% of CPU inference time), so loading CLIP asks it
to keep them. Between phases the defaults come back and the free pages are trimmed, or the next
phase would start on the last one's high-water mark and never give back what it frees.

`curate` also keeps every thread on one malloc arena: glibc gives each new thread an arena of its
own (up to eight per core), and what Beam's worker threads free in theirs was not handed back.
`curate decide` alone at 50k rows peaked at 1,691 MB with the default arenas and 1,408 MB with one.
"""

from __future__ import annotations

import ctypes
import gc

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_KEEP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap, and freed heap kept up to 1 GiB


def _libc():
    """glibc, or None where there is none (its tuning calls are glibc's own)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_thresholds(libc, threshold: int) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, threshold)


def share_one_arena() -> None:
    """One malloc arena for the whole process: call before threads start allocating."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


def keep_freed_memory() -> None:
    """Serve big blocks from the heap and keep freed heap instead of returning it (process-wide)."""
    libc = _libc()
    if libc is not None:
        _set_thresholds(libc, _KEEP_THRESHOLD)


def release_freed_memory() -> None:
    """glibc's default policy again, and the heap's free pages back to the OS."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        _set_thresholds(libc, _GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
