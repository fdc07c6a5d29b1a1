"""The fused local-search coarse kernel (CUDA) against the PyTorch path in float64 on the CPU."""

import pytest
import torch

from cryorefine.estep import fused_local
from cryorefine.estep.diff2 import local_scores_gathered
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection.extract import prepare_padded_transform


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [5, 17, 40, 70])  # blocks of 16, 32 and 64 translations; 70: two launches
def test_gpu_fused_local_scores_match_float64_gathered_path(T):
    torch.manual_seed(1)
    box, pad, U, n, L = 32, 2, 300, 7, 45
    vol = torch.randn(box, box, box, dtype=torch.float64)
    # the whole rfft square: pixels past Nyquist reach beyond the padded grid (its border is read) and both Friedel
    # halves
    ky, kx = torch.meshgrid(
        torch.arange(-box // 2, box // 2, dtype=torch.float64),
        torch.arange(0, box // 2 + 1, dtype=torch.float64),
        indexing="ij",
    )
    ky, kx = ky.flatten(), kx.flatten()
    R = euler_to_matrix(torch.rand(U) * 360, torch.rand(U) * 180, torch.rand(U) * 360)
    idx = torch.randint(0, U, (n, L))
    a = torch.randn(n, T, 2 * kx.numel(), dtype=torch.float64)
    b = torch.rand(n, kx.numel(), dtype=torch.float64)
    cross_ref, third_ref = local_scores_gathered(prepare_padded_transform(vol, pad), R, idx, ky, kx, a, b)
    ref32 = prepare_padded_transform(vol.float().cuda(), pad)
    assert fused_local.available(a.float().cuda(), "fp32"), (
        "Triton missing from the CUDA build: the fused kernel would not run"
    )
    cross, third = fused_local.local_scores(
        ref32, R.float().cuda(), idx.cuda(), ky.float().cuda(), kx.float().cuda(), a.float().cuda(), b.float().cuda()
    )
    e_cross = float((cross.cpu().double() - cross_ref).abs().max() / cross_ref.abs().max())
    e_third = float((third.cpu().double() - third_ref).abs().max() / third_ref.abs().max())
    print(f"fused local scores vs float64 (T={T}): max rel err cross {e_cross:.2e}, |P|² term {e_third:.2e}")
    assert e_cross < 1e-5 and e_third < 1e-5
