"""Host-to-device copies that do not stall the GPU stream."""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: np.ndarray | torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (a host array or tensor) on ``device``. To a GPU the copy goes through pinned memory without blocking:
    a copy from ordinary (pageable) host memory makes the host wait until the device has finished all queued work,
    so each one would empty the queue between the E-step's kernels."""
    t = torch.as_tensor(x)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda" or t.device.type == "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)
