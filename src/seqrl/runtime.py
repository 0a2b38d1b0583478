"""Process-level settings for training on CPU: glibc malloc thresholds.

An RL step on CPU allocates and frees the same multi-megabyte activations (logits, MLP intermediates, attention
outputs, their gradients) every step. glibc's malloc serves a request above its mmap threshold (dynamic: 128 KiB,
raised up to 32 MiB as mmapped blocks are freed) with a fresh mmap, whose pages fault in and are zeroed on first
touch, and hands the heap's free top back to the OS above its trim threshold. With both thresholds fixed high the
freed blocks are reused: on tiny_dense's RL step (1 thread) page faults fell from ~300k to ~115k per benchmark
process, the rollout from ~130 to ~105 ms, the reference log-probs from ~60 to ~42 ms, and peak RSS did not move
(bench/rl_step.py). This is what the `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` environment variables do
at start-up; PyTorch's CPU tuning guides reach for the same by preloading tcmalloc or jemalloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 64 << 20  # blocks below 64 MiB come from the heap and are reused after free
TRIM_THRESHOLD = 1 << 30  # up to 1 GiB of free heap top is kept for the next step
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def tune_malloc() -> bool:
    """Fix glibc malloc's mmap threshold at 64 MiB and its trim threshold at 1 GiB (mallopt) for this process.

    True when applied; False, changing nothing, off glibc (macOS, musl, Windows) or when the environment already
    decides (any of USER_SETTINGS set: the user's thresholds or tunables, or a preloaded allocator)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
