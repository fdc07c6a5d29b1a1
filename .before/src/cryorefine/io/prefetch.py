"""Read ahead: load the next item on a background thread while the caller works on the current one."""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Final, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _End(enum.Enum):
    END = enum.auto()


_END: Final = _End.END


def read_ahead(load: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order; load(next item) runs on one background thread meanwhile.

    ``items`` may be a lazy iterator (a task pool's batches): the next item is drawn when the current one is
    yielded. At most two loaded items exist at once (the one yielded and the next), so memory stays bounded by them.
    ``load`` runs on that thread only, so whatever it caches (open memory-mapped stacks) is never used concurrently.
    """
    it = iter(items)
    item = next(it, _END)
    if item is _END:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, item)
        while item is not _END:
            result = pending.result()
            following = next(it, _END)
            if following is not _END:
                pending = pool.submit(load, following)
            yield item, result
            item = following
