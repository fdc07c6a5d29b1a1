"""The E-step's stage timer protocol (refine/timing.py StageTimer) and a timer that records nothing."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class Stages(Protocol):
    """Times the paper's stages by name, their sub-stages, and counts floating-point operations and memory traffic."""

    def __call__(self, name: str) -> AbstractContextManager: ...

    def substage(self, name: str) -> AbstractContextManager: ...

    def add_flops(self, name: str, flops: float, shapes=()) -> None: ...

    def add_bytes(self, name: str, nbytes: float) -> None: ...


class NoStages:
    """A Stages that records nothing (tests, benchmarks, callers without a timer)."""

    def __call__(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def substage(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def add_flops(self, name: str, flops: float, shapes=()) -> None:
        return None

    def add_bytes(self, name: str, nbytes: float) -> None:
        return None


NO_STAGES = NoStages()
