"""The Triton warm-up child compiles exactly the kernel variants a CUDA run launches."""

import os
import subprocess
import sys

import pytest
import torch

from cryorefine import kernel_warmup


def test_no_child_without_cuda():
    assert kernel_warmup.start("cpu") is None


RUN_LIKE = """
import torch
from cryorefine.estep import fused_local
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.projection.insert import BackProjector
torch.manual_seed(0)
box, pad, dev = 40, 2, "cuda"
ky, kx = torch.randn(700, device=dev) * 6, torch.rand(700, device=dev) * 12
R = euler_to_matrix(torch.rand(90) * 360, torch.rand(90) * 180, torch.rand(90) * 360).float().to(dev)
bp = BackProjector.zeros(box, pad, dev)
bp.insert(R, ky, kx, torch.randn(90, 700, dtype=torch.complex64, device=dev), torch.rand(90, 700, device=dev))
ref = prepare_padded_transform(torch.randn(box, box, box, device=dev), pad)
for T in (1, 9, 21, 33, 84):  # a run's translation counts: every block size, and a split launch
    fused_local.local_scores(ref, R, torch.randint(0, 90, (13, 57), device=dev), ky, kx, torch.randn(13, T, 1400, device=dev), torch.rand(13, 700, device=dev))
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_warmup_compiles_the_variants_a_run_uses(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-m", "cryorefine.kernel_warmup", "cuda"], env=env, check=True, timeout=300)
    warmed = sorted(p.name for p in tmp_path.iterdir())
    assert warmed
    subprocess.run([sys.executable, "-c", RUN_LIKE], env=env, check=True, timeout=300)
    print(f"{len(warmed)} cache entries after the warm-up")
    assert sorted(p.name for p in tmp_path.iterdir()) == warmed, "the run compiled a variant the warm-up missed"
