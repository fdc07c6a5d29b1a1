"""One background thread for an iteration's files, so that writing them overlaps the next iteration's E-step.

Jobs run one at a time in submission order; submitting waits for the job before (at most one in flight, so a slow
disk holds the run back rather than piling up copies). An error in a job is raised in the caller at the next
submit, wait or close.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundWriter:
    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, fn, *args, **kwargs) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cryorefine-writer")
        self._pending = self._pool.submit(fn, *args, **kwargs)

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
