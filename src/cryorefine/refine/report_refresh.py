"""report.html refreshed at most every REPORT_INTERVAL_S during a run (and always at its end), drawn in a worker
process."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .. import worker_process

REPORT_INTERVAL_S = 30.0


def draw_report(*args) -> None:
    """report.write_report(*args), imported here: matplotlib loads in the worker process only."""
    from ..report import write_report

    write_report(*args)


def load_report_module() -> None:
    """What draw_report needs, matplotlib among it, loaded into the worker process ahead of the first report."""
    from .. import report  # noqa: F401


class ReportRefresher:
    """The latest report to write, held back while the last refresh is recent or still being drawn. The first refresh
    comes REPORT_INTERVAL_S into the run.

    A worker process draws them (spawned at the first refresh, kept for the run): the plots take ~1.4 s of CPU (a 256³
    map, 5,000 particles; 2-core machine), which in the run's process held the interpreter lock that the thread
    queuing the GPU's work needs, and the final report is drawn while the final maps are written. Where no worker
    process can start, or the worker ends (killed), the reports are drawn in the run's process. ``warn`` is told (one
    line) when a report could not be drawn; the run goes on. ``draw`` (picklable, module-level): what draws, given
    submit's arguments."""

    def __init__(self, warn: Callable[[str], None] = print, draw: Callable[..., None] = draw_report) -> None:
        self._written = time.monotonic()
        self._pending: tuple | None = None
        self._drawing: tuple[Future, tuple] | None = None  # the report being drawn and its arguments
        self._pool: ProcessPoolExecutor | None = None
        self._in_process = False  # the worker ended: the run's process draws the rest
        self._warn, self._draw = warn, draw

    def submit(self, args: tuple, force: bool = False) -> None:
        """``args`` (picklable) of the latest report; drawn now if due and none is being drawn, or ``force``d (then
        after the one being drawn)."""
        self._pending = args
        if force:
            self._wait()
        elif self._drawing is not None and self._drawing[0].done():
            self._wait()  # its error, if any, told
        if force or (self._drawing is None and time.monotonic() - self._written >= REPORT_INTERVAL_S):
            self._start()

    def prepare(self) -> None:
        """Start the worker process now and load the report's modules there, beside the run: a run shorter than
        REPORT_INTERVAL_S draws its first report at its end, which then also waited for a new process's imports
        (~2 s). Where matplotlib or a worker process is missing, nothing to do (the first report tells)."""
        if self._pool is not None or self._in_process or importlib.util.find_spec("matplotlib") is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._submit(load_report_module)

    def close(self) -> None:
        """End the worker process without drawing what is held back (a run that failed)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool, self._drawing = None, None

    def flush(self) -> None:
        """Draw the report held back, if any, and return once report.html is written (a run's end); the worker
        process ends."""
        self._wait()
        self._start()
        self._wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _start(self) -> None:
        if self._pending is None:
            return
        args, self._pending = self._pending, None
        self._written = time.monotonic()
        if self._in_process:
            self._report(lambda: self._draw(*args))
            return
        try:
            self._drawing = (self._submit(self._draw, *args), args)
        except (OSError, RuntimeError) as exc:  # no worker (a broken pool is a RuntimeError too): draw it here
            self._warn(f"report.html drawn in the run's process: no worker process ({exc})")
            self._pool, self._in_process = None, True
            self._report(lambda: self._draw(*args))

    def _submit(self, fn: Callable[..., None], *args) -> Future:
        """fn(*args) in the worker process, started at the first call."""
        self._pool, job = worker_process.submit(self._pool, fn, *args)
        return job

    def _wait(self) -> None:
        if self._drawing is None:
            return
        (drawing, args), self._drawing = self._drawing, None

        def result() -> None:
            try:
                drawing.result()
            except BrokenProcessPool:  # the worker ended (killed, out of memory): this one and the rest drawn here
                self._warn("report.html drawn in the run's process: its worker process ended")
                self._pool, self._in_process = None, True
                self._draw(*args)

        self._report(result)

    def _report(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as exc:  # noqa: BLE001 - a report problem never stops a refinement
            self._warn(f"report.html not written: {type(exc).__name__}: {exc}")
