"""Hand freed host memory back to the OS in a worker process (glibc's malloc; a no-op elsewhere).

A CPU worker allocates and frees the same large tensors over and over: ZeRO-3 gathers each layer for
the forward and the backward and frees it after, and activations live for one step. glibc raises its
mmap threshold to the size of the largest block freed (up to 32 MiB), after which every tensor below
that comes from the heap, and freed heap blocks stay in the process (RSS) unless they sit at its top.
Measured on a 195M-param Qwen2 shape with LoRA on 2 CPU workers: 550-770 MiB per worker that
`malloc_trim` hands back after each step, growing from step to step (BENCHMARKS.md, "Worker memory").
Fixing the threshold makes large tensors mmap'd, so they go back to the OS when freed; `release`
trims what the heap still holds after loading and after each step.

Opt-in (`cluster.release_host_memory`), apart from one trim after set-up: with the threshold fixed,
every large tensor is a fresh mmap whose pages fault in again, and a ZeRO-3 step on CPU ran 1.5x slower
(1.85 -> 2.8 s, `bench/engine_overhead.py 3` with glibc's MALLOC_MMAP_THRESHOLD_ at 1 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks of 1 MiB and more (a hidden x hidden fp32 weight from hidden 512 on) are mmap'd: freeing one
# unmaps it. Smaller ones stay on the heap, where reusing them is cheap.
MMAP_THRESHOLD_BYTES = 1 << 20
# The heap's free top beyond this goes back to the OS at each free (glibc's default is 128 KiB until
# the dynamic threshold moves it to 64 MiB).
TRIM_THRESHOLD_BYTES = 32 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def fix_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds (turning off their growth) for this process; call it
    before the model loads. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def release() -> None:
    """Return the heap's free pages to the OS (malloc_trim); milliseconds, so once per step is cheap."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
