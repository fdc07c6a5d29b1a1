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


def to_host(tensors) -> list[np.ndarray]:
    """Host copies of ``tensors`` (torch tensors on any device, or arrays) as numpy arrays. From a GPU the copies go
    through pinned memory on a stream of their own, for the thread that writes an iteration's files: a plain .cpu()
    there joined the run's stream, so the run's next read of a device value (any wait for the device) also waited for
    these copies (six 360³ maps at every iteration's start)."""
    on_gpu = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
    if on_gpu:
        side = torch.cuda.Stream(device=on_gpu[0].device)
        side.wait_stream(torch.cuda.current_stream(on_gpu[0].device))  # the work that made them, queued before
        with torch.cuda.stream(side):
            tensors = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                if isinstance(t, torch.Tensor) and t.device.type == "cuda"
                else t
                for t in tensors
            ]
        side.synchronize()  # these copies only
    return [t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in tensors]
