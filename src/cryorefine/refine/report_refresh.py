"""report.html refreshed at most every REPORT_INTERVAL_S during a run (and always at its end)."""

from __future__ import annotations

import time
from typing import Callable

REPORT_INTERVAL_S = 30.0


class ReportRefresher:
    """The latest report to write, held back while the last refresh is recent: its plots take ~1 s of the interpreter
    lock, which a GPU iteration of 2-3 s would wait on. The first refresh comes REPORT_INTERVAL_S into the run."""

    def __init__(self) -> None:
        self._written = time.monotonic()
        self._pending: Callable[[], None] | None = None

    def submit(self, write: Callable[[], None], force: bool = False) -> None:
        self._pending = write
        if force or time.monotonic() - self._written >= REPORT_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Write the report held back, if any (a run's end; a run stopped by --max_seconds)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()
            self._written = time.monotonic()
