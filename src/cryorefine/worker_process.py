"""Worker processes beside the run (spawned; one unless asked for more), for Python work that would otherwise hold the
interpreter lock the thread queuing the GPU's work needs: drawing reports, formatting STAR files."""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor


_STARTING = threading.Lock()  # one process start at a time: each swaps the main module's spec


def submit(
    pool: ProcessPoolExecutor | None, fn: Callable, *args, workers: int = 1, preload: str | None = None
) -> tuple[ProcessPoolExecutor, Future]:
    """fn(*args) in one of ``pool``'s worker processes, a new pool of up to ``workers`` (spawned: the run's CUDA state
    is not forked) where None, each of which imports the module ``preload`` (if any) as it starts. A process starts
    at a submit that finds none idle, up to ``workers``. Returns the pool and the job's future. Raises OSError or
    RuntimeError where no process can start (a broken pool is a RuntimeError too)."""
    with _STARTING, _main_module_not_rerun():
        if pool is None:
            pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start, initargs=(preload,)
            )
        return pool, pool.submit(fn, *args)


def _start(preload: str | None) -> None:
    """In a new worker: Ctrl-C is the run's to handle (the worker ends with it), not a traceback of its own; then
    ``preload`` imported, so that the first job does not wait for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if preload is not None:
        importlib.import_module(preload)


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
