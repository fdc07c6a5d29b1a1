"""The task pool: an E-step's particle batches handed out one at a time to whichever rank is free.

A counter per E-step (key) in torch.distributed's store: ``store.add(key, 1)`` returns the next batch index, so a
faster rank takes more batches. With one process the counter is local. Results must not depend on which rank does a
batch (the E-step keys its random noise by batch).

Test hook: debug_hooks.slow_rank_delay (CRYOREFINE_SLOW_RANK) makes a rank sleep after each batch (load balancing).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterator

from ..debug_hooks import slow_rank_delay
from .collectives import guarded
from .context import Dist


class TaskPool:
    def __init__(self, dist: Dist):
        self.dist = dist
        self._local: Counter[str] = Counter()
        self._taken = 0
        self._sleep = slow_rank_delay(dist.rank)

    def _add(self, key: str, n: int) -> int:
        if self.dist.store is None:
            self._local[key] += n
            return self._local[key]
        with guarded(self.dist, "the task pool"):
            return int(self.dist.store.add(f"cryorefine/pool/{key}", n))

    def take(self, key: str, n_batches: int) -> Iterator[int]:
        """Batch indices for this rank, each taken when the previous one is done; ``key`` names one E-step pass."""
        while (i := self._add(f"{key}/next", 1) - 1) < n_batches:
            self._taken += 1
            yield i
            time.sleep(self._sleep)

    def taken_since_last_call(self) -> int:
        n, self._taken = self._taken, 0
        return n

    def progress(self, key: str, bar) -> Callable[[int], None]:
        """Callback for n particles done on this rank: counts over all ranks in the store; ``bar`` (or None) shows
        the total."""

        def done(n: int) -> None:
            total = self._add(f"{key}/done", n)
            if bar is not None:
                bar.set(total)

        return done
