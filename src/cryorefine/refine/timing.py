"""Wall time per stage (the paper's getFourier / getAll / convertAll / storeWeighted / M-step breakdown)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device=None):
        self.seconds = defaultdict(float)
        self.cuda = device is not None and torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def reset(self) -> dict:
        out = dict(self.seconds)
        self.seconds.clear()
        return out
