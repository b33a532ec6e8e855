"""CPU training: keep freed memory in the process instead of handing it back to the kernel.

PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults every allocation above the
(dynamic) mmap threshold is a fresh ``mmap`` and freed heap space above 128 KiB is trimmed, so a training
step that allocates and frees the same activations and gradients every time page-faults (and the kernel
zeroes) hundreds of megabytes per step. An MoE allocates more of them than its dense model (a gradient
per expert), so it pays more. Raising the mmap threshold to glibc's maximum (32 MiB) and never trimming
the heap makes later steps reuse the same pages. Measured with ``benchmarks/train_step.py`` (GPT-2-small,
1,024 tokens per step, 2 cores): dense 6.5 → 5.4 s per step, its MoE 7.1 → 5.7 s, and the per-round
spread of MoE ÷ dense from 1.02–1.34 down to 1.01–1.11. Allocations above 32 MiB (the LM head's logits)
still come from ``mmap``, so nothing changes for huge one-off buffers.

The cost: the process keeps its high-water mark of heap memory until it exits, which is what a training
process does anyway. Turn it off with ``--no-cpu-keep-memory``. The settings are process-wide and only
have an effect with glibc (Linux); elsewhere this is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

#: glibc accepts mmap thresholds up to HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 << 20
#: -1 turns trimming off altogether (mallopt(3)). The largest positive int (2 GiB) does not: once a step
#: frees more than 2 GiB at the top of the heap (an MoE's gradients and activations do), glibc hands it
#: back and the next step page-faults all of it again.
TRIM_THRESHOLD = -1


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # glibc only: musl and others have no (or an inert) mallopt.
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory(heap_only: bool = False) -> bool:
    """Set glibc's malloc to reuse freed memory (see the module docstring). ``heap_only`` also serves
    allocations above 32 MiB from the heap (no ``mmap`` at all), so after a warm-up step nothing
    page-faults; the benchmarks use it to compare compute alone. True when every setting took effect,
    False where the C library is not glibc or refused them."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD)) == 1
    ok &= libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD)) == 1
    if heap_only:
        ok &= libc.mallopt(ctypes.c_int(M_MMAP_MAX), ctypes.c_int(0)) == 1
    return ok
