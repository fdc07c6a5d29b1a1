"""Work over a range in tiles; a tile that runs out of memory is halved and retried (the paper's adaptive allocation).

``compute(start, stop)`` must have no side effects (its result is dropped when it fails); ``commit(start, stop,
result)`` applies the result and is never retried, so a failed tile is never counted twice.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from .errors import CryoInputError

R = TypeVar("R")


class TileTooLarge(CryoInputError):
    """A tile's predicted memory exceeds the budget: halving it may help; for a single item the message is final."""


OUT_OF_MEMORY = (torch.OutOfMemoryError, TileTooLarge)


def run_tiles(total: int, size: int, compute: Callable[[int, int], R], commit: Callable[[int, int, R], None]) -> int:
    """Process [0, total) in tiles of ``size``, halved on running out of memory (and kept); returns the final size.

    A tile of one item that runs out of memory re-raises the error.
    """
    size = max(1, size)
    start = 0
    while start < total:
        stop = min(total, start + size)
        try:
            result = compute(start, stop)
            failed = False
        except OUT_OF_MEMORY:
            if stop - start == 1:
                raise
            failed = True
        if failed:
            # outside the except block: the failed tile's tensors, held by the traceback, are gone by now
            size = (stop - start) // 2
            release_cached_memory()
            continue
        commit(start, stop, result)
        del result  # not alive while the next tile is computed
        start = stop
    return size


def release_cached_memory() -> None:
    """Return the CUDA allocator's unused blocks, so a halved tile finds them free (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
