"""A hidden hook for the kill tests: stop at a named point of a run, so that a SIGKILL lands there every time.

With CRYOREFINE_TEST_PAUSE_AT=STAGE:KEY (estep:2 = between the half sets of iteration 2's E-step, mstep:2 = in
iteration 2's M-step after the half maps are reconstructed, write:NAME = a temporary holds the new content of file
NAME but is not yet renamed onto it), the process writes the file named by CRYOREFINE_TEST_PAUSE_MARKER (default
cryorefine_paused.txt in the current directory) on reaching that point and sleeps until it is killed.
Without the variable, pause_point does nothing.
"""

from __future__ import annotations

import os
import time
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
