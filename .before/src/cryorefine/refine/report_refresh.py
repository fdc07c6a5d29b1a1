"""report.html refreshed at most every REPORT_INTERVAL_S during a run (and always at its end), drawn in a worker
process."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

REPORT_INTERVAL_S = 30.0


def draw_report(*args) -> None:
    """report.write_report(*args), imported here: matplotlib loads in the worker process only."""
    from ..report import write_report

    write_report(*args)


class ReportRefresher:
    """The latest report to write, held back while the last refresh is recent or still being drawn. The first refresh
    comes REPORT_INTERVAL_S into the run.

    A worker process draws them (spawned at the first refresh, kept for the run): the plots take ~1.4 s of CPU (a 256³
    map, 5,000 particles; 2-core machine), which in the run's process held the interpreter lock that the thread
    queuing the GPU's work needs, and the final report is drawn while the final maps are written. Where no worker
    process can start, the report is drawn in the run's process. ``warn`` is told (one line) when a report could not
    be drawn; the run goes on. ``draw`` (picklable, module-level): what draws, given submit's arguments."""

    def __init__(self, warn: Callable[[str], None] = print, draw: Callable[..., None] = draw_report) -> None:
        self._written = time.monotonic()
        self._pending: tuple | None = None
        self._drawing: Future | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._warn, self._draw = warn, draw

    def submit(self, args: tuple, force: bool = False) -> None:
        """``args`` (picklable) of the latest report; drawn now if due and none is being drawn, or ``force``d (then
        after the one being drawn)."""
        self._pending = args
        if force:
            self._wait()
        elif self._drawing is not None and self._drawing.done():
            self._wait()  # its error, if any, told
        if force or (self._drawing is None and time.monotonic() - self._written >= REPORT_INTERVAL_S):
            self._start()

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
        try:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._drawing = self._pool.submit(self._draw, *args)
        except (OSError, RuntimeError) as exc:  # no worker (a broken pool is a RuntimeError too): draw it here
            self._warn(f"report.html drawn in the run's process: no worker process ({exc})")
            self._pool = None
            self._report(lambda: self._draw(*args))

    def _wait(self) -> None:
        if self._drawing is not None:
            drawing, self._drawing = self._drawing, None
            self._report(drawing.result)

    def _report(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as exc:  # noqa: BLE001 - a report problem never stops a refinement
            self._warn(f"report.html not written: {type(exc).__name__}: {exc}")
