"""Compile the Triton kernels (projection/insert_kernel.py, estep/fused_local.py) in a child process when a CUDA run
starts, so that the run finds them in Triton's on-disk cache when it first needs them.

A cold compile costs ~0.5-1.5 s per kernel variant, paid in the middle of the first iteration that uses it (the
insertion in iteration 1, the local-search kernel when local searches begin); the child does it on another CPU core
while the run reads its particles and runs its global iterations. The child's launches are tiny and use the same
argument types, so they compile exactly the variants the run will look up; if the run gets there first it compiles
the kernel itself, as without the child (Triton writes its cache files atomically).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

TRANSLATION_COUNTS = (5, 20, 40)  # one per block size of fused_local (16, 32, 64 translations)


def start(device) -> subprocess.Popen | None:
    """The child process compiling the kernels for a run on ``device``, or None (not CUDA, no Triton, or not the
    node's first rank: the ranks of a node share the cache)."""
    from .projection import insert_kernel

    if not str(device).startswith("cuda") or insert_kernel.triton is None or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    return subprocess.Popen([sys.executable, "-m", "cryorefine.kernel_warmup", str(device)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def compile_kernels(device) -> None:
    """Launch each kernel variant once on tiny inputs (their results are discarded)."""
    from .estep import fused_local
    from .projection.extract import prepare_padded_transform
    from .projection.insert import BackProjector

    box, pad, n_rot, n = 4, 2, 2, 2
    ky = torch.zeros(3, device=device)
    kx = torch.ones(3, device=device)
    rot = torch.eye(3, device=device).expand(n_rot, 3, 3)
    bp = BackProjector.zeros(box, pad, device)
    bp.insert(rot, ky, kx, torch.ones(n_rot, 3, dtype=torch.complex64, device=device), torch.ones(n_rot, 3, device=device))
    ref = prepare_padded_transform(torch.zeros(box, box, box, device=device), pad)
    idx = torch.zeros(n, 1, dtype=torch.long, device=device)
    for T in TRANSLATION_COUNTS:
        fused_local.local_scores(ref, rot, idx, ky, kx, torch.zeros(n, T, 6, device=device), torch.zeros(n, 3, device=device))
    torch.cuda.synchronize(device)


if __name__ == "__main__":
    compile_kernels(sys.argv[1])
