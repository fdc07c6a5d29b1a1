"""A progress bar per iteration (tqdm) with particles per second and time left; plain lines when not a terminal.

Under torchrun only rank 0 shows it (``enabled``), set to the particles done on all ranks.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.t0 = time.perf_counter()
        self.last_print = self.t0

    def __enter__(self):
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.label, unit="ptcl", leave=False, file=sys.stderr)
        return self

    def set(self, done: int) -> None:
        """``done`` particles so far (all ranks)."""
        step, self.done = done - self.done, done
        if self.bar is not None:
            self.bar.update(step)
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_print > 30 or self.done >= self.total:
            rate = self.done / max(now - self.t0, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"{self.label}: {self.done}/{self.total} particles, {rate:.1f}/s, {left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )
            self.last_print = now

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
