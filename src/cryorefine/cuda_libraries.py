"""The GPU's set-up for a run: its allocator's setting, and its libraries started beside the run's start-up instead of
at their first use in it."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

ALLOCATOR_ENVIRONMENT = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the user's allocator settings win


def use_expandable_segments(device) -> bool:
    """On a GPU, the CUDA caching allocator's expandable segments, unless the environment configures the allocator:
    True where they were turned on. Called before the run's first allocation (CUDA need not have started: PyTorch
    keeps the setting for its allocator), so that the libraries' thread allocates in them too. A run's tiles change
    shape with every window and sampling; with fixed segments a larger tile found no cached block, so the allocator
    released its cache (synchronising) and called cudaMalloc again (H100, TRPV1-like 5k: up to 130 cudaMalloc, 126
    cudaFree and 5 retries in one iteration). Expandable segments grow one mapping instead: no cudaFree or retry in
    any run, 0.4 s of betagal-like's 11.7 s of iterations (bench/results/2026-12-06f-allocator-ab.md)."""
    if torch.device(device).type != "cuda" or any(os.environ.get(name) for name in ALLOCATOR_ENVIRONMENT):
        return False
    # PyTorch's runtime setter (the environment variable is read once, when CUDA starts); renamed in 2.13
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
        torch.cuda.memory, "_set_allocator_settings", None
    )
    if setter is None:
        return False
    try:
        setter("expandable_segments:True")
    except RuntimeError:  # an allocator that has no such setting (a pluggable one): left as it is
        return False
    return True


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
