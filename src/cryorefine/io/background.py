"""One background thread for an iteration's files, so that writing them overlaps the next iteration's E-step.

Jobs run one at a time in submission order; submitting waits for the job before (at most one in flight, so a slow
disk holds the run back rather than piling up copies). An error in a job is raised in the caller at the next
submit, wait or close.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .. import worker_process
from . import star


def side_by_side(jobs: Sequence[Callable[[], object]], threads: int) -> None:
    """Run independent file jobs (``threads`` at once; one: here, in order), each with the caller's context (the
    STAR text's maker, TEXT_MAKER); the first error is raised once all have ended. For the files a run's end waits
    for: the map writes let go of the interpreter lock, and STAR files' text is made in the worker process."""
    if threads <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="cryorefine-files") as pool:
        done = [pool.submit(contextvars.copy_context().run, job) for job in jobs]
    for future in done:
        future.result()


def _ready() -> None:
    """Nothing: the worker imports this module (and with it the STAR text's modules, pandas among them) to run it."""


class StarTextInProcess:
    """STAR files' text made in a worker process (worker_process): formatting an iteration's tables (~0.4-0.6 s of
    Python for 9,000 particles) in the writer thread held the interpreter lock that the thread queuing the GPU's
    work needs. Where no worker starts, or it ends, the text is made here."""

    def __init__(self, make: Callable[[dict], str] = star.star_text):
        self._make = make  # picklable (module-level)
        self._pool: ProcessPoolExecutor | None = None
        self._here = False

    def __call__(self, blocks: dict) -> str:
        if not self._here:
            try:
                self._pool, job = worker_process.submit(self._pool, self._make, blocks)
            except (OSError, RuntimeError):  # no worker process can start
                self._make_here()
            else:
                try:
                    return job.result()  # the text's own errors are raised as they are
                except BrokenProcessPool:  # the worker ended (killed, out of memory)
                    self._make_here()
        return self._make(blocks)

    def prepare(self) -> None:
        """Start the worker now, beside the run: its start and imports (~1 s) held up the first iteration's files,
        and the second iteration's submit waited for them (betagal-like on an H100: 0.8-0.9 s against 0.3-0.4 s with
        no files written)."""
        if self._pool is not None or self._here:
            return
        try:
            self._pool, _ = worker_process.submit(self._pool, _ready)
        except (OSError, RuntimeError):  # no worker process can start
            self._make_here()

    def _make_here(self) -> None:
        self.close()
        self._here = True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class BackgroundWriter:
    def __init__(self, star_in_process: bool = False):
        """``star_in_process``: STAR files' text made in a worker process (StarTextInProcess; on a GPU, where the
        run's thread is host-bound)."""
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._star = StarTextInProcess() if star_in_process else None

    def prepare(self) -> None:
        """Start what the first job will need (the STAR text's worker process) before it is submitted."""
        if self._star is not None:
            self._star.prepare()

    def submit(self, fn, *args, **kwargs) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cryorefine-writer")
        self._pending = self._pool.submit(self._job, fn, *args, **kwargs)

    def _job(self, fn, *args, **kwargs) -> None:
        token = star.TEXT_MAKER.set(self._star)
        try:
            fn(*args, **kwargs)
        finally:
            star.TEXT_MAKER.reset(token)

    def wait(self) -> None:
        """Block until the job in flight is done (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            if self._star is not None:
                self._star.close()
