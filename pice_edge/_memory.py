"""Giving memory back after a model is dropped (a rollout's old build, a closed runtime).

Dropping the last reference is not enough on its own: a model's modules refer to each other
(collected only by the cycle collector), PyTorch's CUDA caching allocator keeps freed blocks for
reuse, and glibc keeps freed blocks below its mmap threshold in the heap. Without this an edge's
RSS grew by a model's size with every rollout (issue 27, D4).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from typing import Any


def free_memory(*, cuda: bool = False) -> None:
    """Collect reference cycles, empty CUDA's cache (``cuda``, and only where torch is already
    imported: this never imports it) and trim the C heap (glibc only)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if cuda and torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None off glibc (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
