"""Test and benchmark hooks: the only module that reads them from the environment (production code asks here).

- CRYOREFINE_TEST_PAUSE_AT=STAGE:KEY (kill tests): pause_point stops a run at a named point (estep:2 = between the
  half sets of auto-refine's iteration 2 E-step, after classification's; mstep:2 = in iteration 2's M-step, after the
  half-set FSC or the first class's map; write:NAME = a temporary holds the new content of file NAME but is not yet
  renamed onto it), writes the file named by
  CRYOREFINE_TEST_PAUSE_MARKER (default cryorefine_paused.txt in the current directory) and sleeps until killed.
- CRYOREFINE_SLOW_RANK=RANK:SECONDS (load-balancing tests): that rank sleeps after each E-step batch.
- CRYOREFINE_PROFILE=ITERATIONS (benchmarks; e.g. 8,final), CRYOREFINE_PROFILE_OUT, CRYOREFINE_PROFILE_MODE=python
  or waits, CRYOREFINE_PROFILE_FOCUS: which iterations refine/timing.py profiles, and how.
Without the variables every hook does nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def pause_point(stage: str, key, settle=None) -> None:
    """Sleep forever here if CRYOREFINE_TEST_PAUSE_AT names this stage and key; ``settle()`` first (the background
    writer's wait: the earlier iteration's files are complete, as a kill a moment later would find them)."""
    if os.environ.get("CRYOREFINE_TEST_PAUSE_AT") != f"{stage}:{key}":
        return
    if settle is not None:
        settle()
    marker = Path(os.environ.get("CRYOREFINE_TEST_PAUSE_MARKER", "cryorefine_paused.txt"))
    marker.write_text(f"{stage}:{key} pid {os.getpid()}\n")
    while True:
        time.sleep(60)


def slow_rank_delay(rank: int) -> float:
    """Seconds rank ``rank`` sleeps after each E-step batch (CRYOREFINE_SLOW_RANK), 0 without the hook."""
    spec = os.environ.get("CRYOREFINE_SLOW_RANK", "")
    if not spec:
        return 0.0
    r, seconds = spec.split(":")
    return float(seconds) if int(r) == rank else 0.0


@dataclass(frozen=True)
class ProfileRequest:
    """What CRYOREFINE_PROFILE* ask of refine/timing.py's profiler."""

    iterations: tuple[str, ...]  # iteration numbers as text, and "final"
    out: str | None  # output file (default: profile_itNNN.txt)
    mode: str  # torch (operators), python (cProfile of the Python functions) or waits (where the host waits)
    focus: tuple[str, ...]  # functions whose callees cProfile lists

    def wants(self, iteration: int, final: bool) -> bool:
        return str(iteration) in self.iterations or (final and "final" in self.iterations)


def profile_request() -> ProfileRequest:
    return ProfileRequest(
        tuple(filter(None, os.environ.get("CRYOREFINE_PROFILE", "").split(","))),
        os.environ.get("CRYOREFINE_PROFILE_OUT"),
        os.environ.get("CRYOREFINE_PROFILE_MODE", "torch"),
        tuple(filter(None, os.environ.get("CRYOREFINE_PROFILE_FOCUS", "").split(","))),
    )
