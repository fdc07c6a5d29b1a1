"""The fused local-search coarse kernel (CUDA) against the PyTorch path in float64 on the CPU."""

import pytest
import torch

from cryorefine.estep import fused_local
from cryorefine.estep.diff2 import local_scores_gathered
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection.extract import prepare_padded_transform


def _scores_and_reference(T: int, counts: torch.Tensor | None = None):
    """The kernel's (cross, third) on the GPU and the float64 gathered path's on the CPU, for 7 particles with 45
    candidates each among 300 rotations and T translations."""
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
    reference = local_scores_gathered(prepare_padded_transform(vol, pad), R, idx, ky, kx, a, b)
    ref32 = prepare_padded_transform(vol.float().cuda(), pad)
    assert fused_local.available(a.float().cuda(), "fp32"), (
        "Triton missing from the CUDA build: the fused kernel would not run"
    )
    scores = fused_local.local_scores(
        ref32,
        R.float().cuda(),
        idx.cuda(),
        ky.float().cuda(),
        kx.float().cuda(),
        a.float().cuda(),
        b.float().cuda(),
        counts=None if counts is None else counts.cuda(),
    )
    return [s.cpu().double() for s in scores], reference


def _relative_errors(scores, reference) -> list[float]:
    return [float((s - r).abs().max() / r.abs().max()) for s, r in zip(scores, reference)]


@pytest.mark.parametrize("T", [5, 17, 40, 70])  # blocks of 16, 32 and 64 translations; 70: two launches
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_local_scores_match_float64_gathered_path(T):
    scores, reference = _scores_and_reference(T)
    e_cross, e_third = _relative_errors(scores, reference)
    print(f"fused local scores vs float64 (T={T}): max rel err cross {e_cross:.2e}, |P|² term {e_third:.2e}")
    assert e_cross < 1e-5 and e_third < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_local_scores_leave_each_particles_padding_at_zero():
    # 45 slots, of which 45, 1, 16, 17, 30, 0 and 33 are valid: the padding on both sides of a 16-candidate block
    counts = torch.tensor([45, 1, 16, 17, 30, 0, 33])
    (cross, third), (cross_ref, third_ref) = _scores_and_reference(9, counts)
    padding = torch.arange(45)[None, :] >= counts[:, None]  # (n, L)
    assert (cross.masked_select(padding[:, None, :]) == 0).all() and (third[padding] == 0).all()
    e_cross, e_third = _relative_errors(
        (cross.masked_fill(padding[:, None, :], 0), third.masked_fill(padding, 0)),
        (cross_ref.masked_fill(padding[:, None, :], 0), third_ref.masked_fill(padding, 0)),
    )
    assert e_cross < 1e-5 and e_third < 1e-5
