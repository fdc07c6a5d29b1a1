"""A worker process beside the run (spawned, one job at a time), for Python work that would otherwise hold the
interpreter lock the thread queuing the GPU's work needs: drawing reports, formatting STAR files."""

from __future__ import annotations

import contextlib
import importlib.machinery
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor


_STARTING = threading.Lock()  # one process start at a time: each swaps the main module's spec


def submit(pool: ProcessPoolExecutor | None, fn: Callable, *args) -> tuple[ProcessPoolExecutor, Future]:
    """fn(*args) in ``pool``'s worker process, a new pool (spawned: the run's CUDA state is not forked) where None;
    the process starts at a pool's first submit. Returns the pool and the job's future. Raises OSError or
    RuntimeError where no process can start (a broken pool is a RuntimeError too)."""
    with _STARTING, _main_module_not_rerun():
        if pool is None:
            pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_interrupts
            )
        return pool, pool.submit(fn, *args)


def _ignore_interrupts() -> None:
    """In the worker: Ctrl-C is the run's to handle (the worker ends with it), not a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _main_module_not_rerun() -> Iterator[None]:
    """While a spawned process starts: the program's main module named as ``__main__`` to multiprocessing, which then
    does not run it again in the new process (it re-runs a script given by path, and a script calling cryorefine
    without an ``if __name__ == "__main__":`` guard would start its work over in the worker). The worker needs
    nothing from it."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    spec = getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = spec
