"""Triton's cache key, computed beside a GPU run's start-up instead of at its first kernel launch."""

from __future__ import annotations

import contextlib
import threading


def start() -> threading.Thread:
    """Compute Triton's cache key in a daemon thread; returns the thread. Before a process's first launch of a
    compiled kernel, Triton hashes its own sources and library (the key of its on-disk kernel cache, once per
    process): 0.33 s of the 2.8 s from a run's start to its first E-step batch (H100, betagal-like). Hashing and
    file reads let go of the interpreter lock, so in this thread the key is made while the run reads its particles
    and images. Without Triton (CPU builds of PyTorch) the thread has nothing to do."""
    thread = threading.Thread(target=_cache_key, name="triton-cache-key", daemon=True)
    thread.start()
    return thread


def _cache_key() -> None:
    try:
        from triton.runtime.cache import triton_key  # Triton 3.3 and later
    except ImportError:
        try:
            from triton.compiler.compiler import triton_key  # earlier releases
        except ImportError:
            return
    with contextlib.suppress(Exception):  # the kernel's own launch computes it again and reports any error
        triton_key()
