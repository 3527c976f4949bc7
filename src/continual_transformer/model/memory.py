"""What the process holds besides tensors: the CPU kernels' caches and the allocator's free lists.

Measured on the bundled stream (`ctt run`, 2-core CPU with AMX, bfloat16): without these
bounds, peak RSS climbed from 1.0 to 1.8 GB over five tasks although the learned state is a
few MB. Two things grew, neither of them tensors:

- Kernel caches. A bfloat16 matrix product on the CPU runs a oneDNN kernel built for its exact
  shape, and two caches keep each one (oneDNN's primitive cache and PyTorch's ideep cache, 1,024
  entries each by default): about 1.6 MB per distinct (rows x inputs -> outputs) shape of a
  linear layer. Rows are batch x padded length, so every new batch shape adds kernels; a
  process that had seen 849 shapes held about 450 MB of them. `bound_kernel_caches` caps both
  caches, which must happen before the first oneDNN call (the caches read their capacity then).
- Freed memory the allocator keeps. glibc keeps freed blocks for reuse; after a phase with
  large activations (training, evaluation) hundreds of MB of free blocks stay in the process.
  `release_freed_memory` hands them back; it takes milliseconds and runs between phases.
  glibc also raises its threshold for serving a block from its own mapping (instead of the
  heap) up to 32 MB as large blocks are freed, so the 20-30 MB arrays of the router and the
  lexical branch end up in the heap and fragment it; `MMAP_THRESHOLD` fixes the threshold at
  8 MB (measured on the bundled stream: peak 1,039 -> 976 MiB, time +3 %; 4 MB gave 952 MiB at
  +5 %).

`limit_process_memory` applies both; loading a backbone calls it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time

# Kernels kept per cache. A cache fills up to its cap as a run meets new batch shapes (longer
# texts bring more), so the cap is memory that grows from task to task: measured on Bible books
# then State of the Union eras (`ctt run`, bfloat16), peak RSS after each task 866 / 968 MiB with
# 64 entries, 767 / 888 MiB with 16 (a kernel missing from the cache is rebuilt when needed).
KERNEL_CACHE_ENTRIES = 16
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


MMAP_THRESHOLD = 8 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def limit_process_memory() -> None:
    """Bound the kernel caches and fix glibc's mmap threshold (each unless the user set it)."""
    bound_kernel_caches()
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Cap the CPU kernel caches at `entries` each, unless the user set them (the variables
    above). Takes effect only if no oneDNN kernel has run yet in this process."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(entries))


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator is not the one to trim
        return None


def release_freed_memory() -> None:
    """Hand memory that is freed but still held by glibc's allocator back to the system.

    glibc keeps freed blocks inside its heaps for reuse; after a task, the freed trunk cache
    and activations stay in the process's RSS (measured on the bundled stream: 1,566 MiB held
    after `sotu_era` without this, 1,191 MiB with it). `malloc_trim` also releases free pages
    in the middle of a heap; it takes milliseconds.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_last_release = [0.0]


def release_freed_memory_at_most_every(seconds: float) -> None:
    """`release_freed_memory`, unless it ran less than `seconds` ago: for paths that run many
    times a second (predictions), where a hand-back per call would cost more than it saves.
    Measured with 100 tasks held (benchmarks/scale.py's probe, 200 predictions of 32 texts):
    705 MB after them with a hand-back at most every second, 581 MB with one every 0.1 s."""
    now = time.monotonic()
    if now - _last_release[0] >= seconds:
        _last_release[0] = now
        release_freed_memory()
