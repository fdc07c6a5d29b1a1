"""The GPU's set-up for a run: its allocator's setting, and its libraries started beside the run's start-up instead of
at their first use in it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from types import SimpleNamespace

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
        first_kernels(device, _start_kernels)
        images = torch.zeros(2, box, box, device=device)
        torch.fft.irfft2(torch.fft.rfft2(images), s=(box, box))  # the images' transforms (float32, 2D)
        if box <= MAX_VOLUME_BOX:
            volume = torch.zeros(box, box, box, dtype=torch.float64, device=device)
            torch.fft.irfftn(torch.fft.rfftn(volume), s=volume.shape)  # the start map's low-pass (float64, 3D)
        square = torch.zeros(64, 64, device=device)
        square @ square  # cuBLAS's handle and workspace (the coarse pass's products)
        first_kernels(device, _iteration_kernels)
        triton_kernels(device)
        torch.cuda.synchronize(device)


# The kernels a run's start-up and first iteration launch first, each on a few values: CUDA loads a kernel's module
# at its first launch (lazy loading), 2-40 ms each on an H100, with the device idle, and the run's thread waited 0.24 s
# in its start-up and 0.32 s in its first iteration for 44 such first launches (bench/first_use_ops.py, betagal-like,
# 2026-12-07); here they are loaded while the run reads its particles. Each call's comment: where the run makes it.
# A module holds an operation's kernels for every dtype and size, except sorting's (a few values are sorted in
# registers, many by a radix sort: 8,192 here). Products and transforms, whose kernels depend on their shapes, are left
# to their first use (and TF32's switch, torch.backends.cuda.matmul.allow_tf32, is the process's: not touched here).
def _start_kernels(t: SimpleNamespace) -> None:
    torch.zeros_like(t.f64).index_add_(0, t.i64 % 4, t.f64)  # mstep/noise.py: shell sums
    t.f64[t.mask], t.mask.sum(), t.f64 == 0.5  # noise.py: the pixels inside, their count, empty shells
    torch.where(t.f64 <= 0.5, 1.0, torch.cos(torch.sqrt(t.f64**2 + t.f64) / 2.0))  # fourier/filters.py: soft edges
    torch.round(torch.sqrt(t.f64)).long()  # fourier/grids.py: shells
    torch.empty(1, pin_memory=t.f64.is_cuda)  # transfer.py: the first pinned buffer


def _iteration_kernels(t: SimpleNamespace) -> None:
    t.f64.view(4, 2, 2) @ torch.eye(2, dtype=t.f64.dtype, device=t.f64.device)  # estep/poses.py: perturbed rotations
    t.i64 // 3, t.i64 % 3, (t.i64.int() >> 1) & 3, t.mask & t.mask  # poses.py, weights.py: ids, radix keys
    torch.argsort(t.many), torch.sort(t.many.float(), descending=True), torch.topk(t.many.float(), 4)  # weights.py
    torch.softmax(t.f32.view(4, 4), 1), torch.log(torch.exp(t.f64))  # weights.py: posteriors
    torch.maximum(t.f64, t.f64), t.f32.min(0), t.f64.max(), t.f64.mean(), t.f32.argmax(), t.f64.argmin()  # M-step
    t.f64.view(4, 4).cumsum(1), t.c64.index_select(0, t.i64 % 4), torch.complex(t.f32, t.f32)  # grids.py, extract.py
    torch.acos(t.f32.clamp(-1, 1)), torch.atan2(t.f64, t.f64), torch.atan(t.f64), -t.f64, t.f64.abs()  # ctf.py


def first_kernels(device: torch.device, kernels: Callable[[SimpleNamespace], None]) -> None:
    """Launch ``kernels``' calls (_start_kernels, _iteration_kernels) on a few values on ``device``."""
    f64 = torch.linspace(0.1, 1.0, 16, dtype=torch.float64, device=device)
    i64 = torch.arange(16, device=device)
    many = torch.arange(8192, 0, -1, device=device)
    kernels(SimpleNamespace(f64=f64, f32=f64.float(), c64=f64.to(torch.complex64), i64=i64, many=many, mask=f64 > 0.5))


def triton_kernels(device: torch.device) -> None:
    """The Triton kernels whose first launch in a process costs most (loading their compiled code; H100: extraction
    46 ms, insertion 13 ms, the others 2-4 ms; bench/triton_first_launch.py), launched on a few values."""
    from .projection import extract_kernel, insert_kernel

    grid = torch.zeros(8, 8, 5, dtype=torch.complex64, device=device)
    if not (extract_kernel.available(grid) and insert_kernel.available(grid.real)):
        return
    rot, k = torch.eye(3, device=device)[None], torch.zeros(4, device=device)
    extract_kernel.extract_fused(grid, 2, rot, k, k, torch.empty(1, 2, 4, device=device))
    insert_kernel.insert_fused(grid, torch.zeros(8, 8, 5, device=device), 2, rot, k, k, grid[0, 0, :4][None], k[None])
