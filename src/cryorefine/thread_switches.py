"""How promptly threads get Python's interpreter lock back while a run's threads share it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# The interpreter lock's hand-over time while a run's threads share it (Python's default is 5 ms). The run's thread
# gives up the lock for every torch call it makes (each kernel launch); whenever the file thread is running Python
# (the last iteration's tables, checkpoint) at that moment, the run's thread waits up to the hand-over time to get it
# back. A GPU run makes thousands of such calls an iteration, so at 5 ms the run's thread, not the GPU, set the pace.
# The other way round at the start: Triton's cache key is hashed in a thread (projection/triton_cache_key.py) that
# waits up to the hand-over time after each file read and hash while the run's thread parses and reads in Python; at
# 5 ms it had not finished by the first kernel launch, which hashed everything again (0.46 s in an H100's start-up).
# bench/gil_handover.py: a thread hashing 400 files while the run's thread is busy in Python for 1.5 s finished after
# 1.51 s at 5 ms and 0.22-0.24 s at 0.2 ms (2-core CPU, bench/results/2026-12-06d-cpu2-gil-handover.md).
SWITCH_INTERVAL_S = 2e-4


@contextlib.contextmanager
def prompt_thread_switches() -> Iterator[None]:
    """SWITCH_INTERVAL_S while the block runs (at most: a shorter one set by the caller stays), then the caller's."""
    before = sys.getswitchinterval()
    if before > SWITCH_INTERVAL_S:  # (nested: left alone, as Python keeps it in whole microseconds, rounded down)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
