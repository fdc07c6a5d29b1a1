"""The GPU's libraries started beside a run's start-up instead of at their first use in it."""

from __future__ import annotations

import contextlib
import threading

import torch

MAX_VOLUME_BOX = 256  # a larger box's float64 volume and transforms (~0.4 GiB at 256) are not worth holding early


def start(device: str, box: int) -> threading.Thread:
    """Start CUDA on ``device`` and load cuFFT's and cuBLAS's kernels in a daemon thread; returns the thread. A run's
    first transform on the GPU (the images' power spectra for the first σ², box ``box``) paid ~0.3 s for cuFFT's
    first plan (H100, betagal-like), and CUDA's own start ~0.3 s more, while the run's thread waited; torch's calls
    let go of the interpreter lock, so in this thread they happen while the run reads its particles and reference.
    The run's own calls wait for CUDA's start where they need it (torch starts it once, under a lock)."""
    thread = threading.Thread(target=_load, args=(torch.device(device), box), name="cuda-libraries", daemon=True)
    thread.start()
    return thread


def _load(device: torch.device, box: int) -> None:
    # the run's own call reports any error (no GPU memory, a broken driver): here it would only be lost
    with contextlib.suppress(Exception):
        images = torch.zeros(2, box, box, device=device)
        torch.fft.irfft2(torch.fft.rfft2(images), s=(box, box))  # the images' transforms (float32, 2D)
        if box <= MAX_VOLUME_BOX:
            volume = torch.zeros(box, box, box, dtype=torch.float64, device=device)
            torch.fft.irfftn(torch.fft.rfftn(volume), s=volume.shape)  # the start map's low-pass (float64, 3D)
        square = torch.zeros(64, 64, device=device)
        square @ square  # cuBLAS's handle and workspace (the coarse pass's products)
        torch.cuda.synchronize(device)
