"""report.html refreshed at most every REPORT_INTERVAL_S during a run (and always at its end), drawn in worker
processes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .. import report_page, worker_process

REPORT_INTERVAL_S = 30.0


def draw_report(*args) -> None:
    """report.write_report(*args), imported here: matplotlib loads in the worker process only."""
    from ..report import write_report

    write_report(*args)


def draw_figure(key: str, *args) -> str:
    """report.draw_figure(key, *args), imported here (in the worker process)."""
    from ..report import draw_figure

    return draw_figure(key, *args)


def report_parts(args: tuple) -> tuple[list[tuple], Callable[[list], None]]:
    """draw_report's ``args`` as one job per figure ((function, *arguments), for the worker processes, the costliest
    first) and what writes the page from their results, in order (in the run's process: report_page needs no
    matplotlib)."""
    out_dir, root, history, fsc, box, angpix, poses, slices = args
    jobs = report_page.figure_jobs(history, fsc, box, angpix, poses, slices)

    def write(figures: list) -> None:
        n = report_page.n_particles(poses)
        report_page.write_page(out_dir, root, history, box, angpix, n, dict(zip([k for k, _ in jobs], figures)))

    return [(draw_figure, key, *a) for key, a in jobs], write


def report_workers() -> int:
    """How many worker processes draw the last report's figures side by side: one per two CPUs this process may use,
    at most 6. The last report is what a short run's end waits for: ~1.4 s drawn by one worker at TRPV1-like's size
    (a 256³ map, 5,000 particles) on a 2-core machine, 0.8 s by two, 1.1 s by three (more workers than cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(6, cpus // 2))


def _started() -> None:
    """A job for a new worker process: nothing (its start imported the report's modules)."""


class ReportRefresher:
    """The latest report to write, held back while the last refresh is recent or still being drawn. The first refresh
    comes REPORT_INTERVAL_S into the run.

    Worker processes draw them (one spawned at prepare(), the others at the first submit; kept for the run): the
    plots take ~1.2 s of CPU (a 256³ map, 5,000 particles; 2-core machine), which in the run's process held the
    interpreter lock that the thread queuing the GPU's work needs. A refresh is one job, drawn by one worker while the
    run goes on; the last report (forced, or held back to the run's end), which the run's end waits for, is split by
    ``parts`` into one job per figure for up to ``workers`` processes side by side, and the page written in the run's
    process. Where no worker process can start, or a worker ends (killed), the reports are drawn in the run's
    process. ``warn`` is told (one line) when a report could not be drawn; the run goes on. ``draw`` (picklable,
    module-level): what draws a whole report, given submit's arguments; ``parts``: those arguments split as
    report_parts does."""

    def __init__(
        self,
        warn: Callable[[str], None] = print,
        draw: Callable[..., None] = draw_report,
        parts: Callable[[tuple], tuple[list[tuple], Callable[[list], None]]] = report_parts,
        workers: int | None = None,
    ) -> None:
        self._written = time.monotonic()
        self._pending: tuple | None = None
        # the report being drawn: its jobs, its arguments, and what writes the page from the jobs' results (None:
        # the one job wrote it)
        self._drawing: tuple[list[Future], tuple, Callable[[list], None] | None] | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._in_process = False  # a worker ended: the run's process draws the rest
        self._warn, self._draw, self._parts = warn, draw, parts
        self._workers = report_workers() if workers is None else workers
        self._started_all = self._workers == 1

    def submit(self, args: tuple, force: bool = False) -> None:
        """``args`` (picklable) of the latest report; drawn now if due and none is being drawn, or ``force``d (then
        after the one being drawn, split into figures: the run's last report)."""
        self._pending = args
        self._start_the_rest()
        if force:
            self._wait()
        elif self._drawing is not None and all(job.done() for job in self._drawing[0]):
            self._wait()  # its error, if any, told
        if force or (self._drawing is None and time.monotonic() - self._written >= REPORT_INTERVAL_S):
            self._start(split=force)

    def prepare(self) -> None:
        """Start one worker process now, loading the report's modules, beside the run: a run shorter than
        REPORT_INTERVAL_S draws its first report at its end, which then also waited for a new process's imports
        (~2 s). The others start at the first submit (an iteration's files, on the writer's thread): six started here
        held the run's start back ~0.4 s (H100, betagal-like). Where matplotlib or a worker process is missing,
        nothing to do (the first report tells)."""
        if self._pool is not None or self._in_process or importlib.util.find_spec("matplotlib") is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._submit(_started)

    def _start_the_rest(self) -> None:
        """Once, with a pool that prepare() started: the rest of the ``workers`` (each submit that finds no worker
        idle starts one more; the idle one takes the first)."""
        if self._pool is None or self._started_all or self._in_process:
            return
        self._started_all = True
        with contextlib.suppress(OSError, RuntimeError):  # a broken pool: the next report tells
            for _ in range(self._workers):
                self._submit(_started)

    def close(self) -> None:
        """End the worker processes without drawing what is held back (a run that failed)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool, self._drawing = None, None

    def flush(self) -> None:
        """Draw the report held back, if any, and return once report.html is written (a run's end); the worker
        processes end."""
        self._wait()
        self._start(split=True)
        self._wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _start(self, split: bool) -> None:
        if self._pending is None:
            return
        args, self._pending = self._pending, None
        self._written = time.monotonic()
        if self._in_process:
            self._report(lambda: self._draw(*args))
            return
        try:
            if split and self._workers > 1:
                jobs, write = self._parts(args)
                self._drawing = ([self._submit(*job) for job in jobs], args, write)
            else:
                self._drawing = ([self._submit(self._draw, *args)], args, None)
        except (OSError, RuntimeError) as exc:  # no worker (a broken pool is a RuntimeError too): draw it here
            self._warn(f"report.html drawn in the run's process: no worker process ({exc})")
            self._pool, self._in_process, self._drawing = None, True, None
            self._report(lambda: self._draw(*args))

    def _submit(self, fn: Callable, *args) -> Future:
        """fn(*args) in a worker process, the pool started at the first call."""
        self._pool, job = worker_process.submit(
            self._pool, fn, *args, workers=self._workers, preload="cryorefine.report"
        )
        return job

    def _wait(self) -> None:
        if self._drawing is None:
            return
        (jobs, args, write), self._drawing = self._drawing, None

        def result() -> None:
            try:
                results = [job.result() for job in jobs]
            except BrokenProcessPool:  # a worker ended (killed, out of memory): this one and the rest drawn here
                self._warn("report.html drawn in the run's process: its worker process ended")
                self._pool, self._in_process = None, True
                self._draw(*args)
                return
            if write is not None:
                write(results)

        self._report(result)

    def _report(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as exc:  # noqa: BLE001 - a report problem never stops a refinement
            self._warn(f"report.html not written: {type(exc).__name__}: {exc}")
