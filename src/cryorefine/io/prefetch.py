"""Read ahead: load the next item on a background thread while the caller works on the current one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(load: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order; load(next item) runs on one background thread meanwhile.

    At most two loaded items exist at once (the one yielded and the next), so memory stays bounded by them.
    ``load`` runs on that thread only, so whatever it caches (open memory-mapped stacks) is never used concurrently.
    """
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(load, items[i + 1])
            yield item, result
