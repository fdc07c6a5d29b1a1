"""RELION's regularisation statistics against hand-computed values (backprojector.cpp's reconstruct)."""

import math

import pytest
import torch

from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.fsc import fsc_to_ssnr
from cryorefine.reconstruction.reconstruct import data_vs_prior, padded_shell_index, reconstruction_noise_power

BOX, PAD, W = 16, 2, 3.0


def _bp(fill_every_other: bool = False) -> BackProjector:
    bp = BackProjector.zeros(BOX, PAD, dtype=torch.float64)
    bp.weight.fill_(W)
    bp.weight[..., 0] = W / 2  # the x = 0 plane is summed with its Friedel mates before use
    if fill_every_other:
        # empty every other z plane: each shell keeps about half of its voxels (the x=0 plane stays Hermitian-paired)
        bp.weight[1::2] = 0.0
    return bp


def test_noise_power_is_inverse_arithmetic_mean_of_weight():
    full = reconstruction_noise_power(_bp(), BOX // 2 + 1)
    assert torch.allclose(full[: BOX // 2], torch.full((BOX // 2,), 1.0 / (PAD**3 * W), dtype=torch.float64))
    # half the voxels empty: RELION averages the weight over all voxels (-> 2/(pad³W)); a mean of 1/w over the
    # non-empty voxels would stay at 1/(pad³W)
    half = reconstruction_noise_power(_bp(True), BOX // 2 + 1)
    r_pad, shell = padded_shell_index(BOX * PAD, PAD)
    inside = r_pad < (BOX // 2) * PAD
    k = torch.arange(BOX * PAD) - BOX * PAD // 2
    z_odd = ((k % 2) == 1)[:, None, None].expand_as(shell)
    for s in (3, 6):
        sel = inside & (shell == s)
        frac_full = 1.0 - (sel & z_odd).sum().item() / sel.sum().item()
        assert math.isclose(half[s].item(), 1.0 / (PAD**3 * W * frac_full), rel_tol=0.06)
        assert half[s].item() > 1.5 / (PAD**3 * W)


def test_data_vs_prior_with_and_without_prior_power():
    n = BOX // 2 + 1
    tau2 = torch.full((n,), 0.5, dtype=torch.float64)
    dvp = data_vs_prior(_bp(), tau2, 4.0, n, max_shell=6)
    assert torch.allclose(dvp[:6], torch.full((6,), W * PAD**3 * 4.0 * 0.5, dtype=torch.float64))
    assert torch.all(dvp[7:] == 0)
    dvp0 = data_vs_prior(_bp(), torch.zeros(n, dtype=torch.float64), 4.0, n, max_shell=6)
    assert torch.allclose(dvp0[:6], torch.full((6,), 0.001 * W * W, dtype=torch.float64))


def test_whole_map_ssnr_uses_relion_fsc_transform():
    fsc = torch.tensor([1.0, 0.5, 0.143, 0.0, -0.2], dtype=torch.float64)
    half = fsc_to_ssnr(fsc)
    whole = fsc_to_ssnr(fsc, whole=True)
    for f, h, w in zip(fsc.tolist(), half.tolist(), whole.tolist()):
        fc = max(f, 0.001)
        ref_h = min(fc, 0.999) / (1 - min(fc, 0.999))
        fw = min(math.sqrt(2 * fc / (fc + 1)), 0.999)
        assert math.isclose(h, ref_h, rel_tol=1e-12)
        assert math.isclose(w, fw / (1 - fw), rel_tol=1e-12)
    assert whole[1] > 2 * half[1]  # at FSC 0.5: 4.45, not twice the half-map SSNR


@pytest.mark.parametrize("gridding", [0, 10])
def test_zero_prior_power_beyond_the_data_leaves_the_map_unchanged(gridding):
    """τ² = 0 on shells without data must not wipe the map (empty voxels' regularised denominators are huge); with
    gridding iterations the prior terms of the empty voxels next to the data enter the blob's convolution, a small
    change at the data's edge only."""
    from cryorefine.reconstruction.reconstruct import reconstruct

    bp = BackProjector.zeros(BOX, PAD, dtype=torch.float64)
    r_pad, _ = padded_shell_index(BOX * PAD, PAD)
    inside = r_pad < 5 * PAD
    g = torch.Generator().manual_seed(0)
    bp.weight[inside] = W
    bp.data[inside] = W * torch.complex(
        torch.randn(int(inside.sum()), generator=g, dtype=torch.float64),
        torch.randn(int(inside.sum()), generator=g, dtype=torch.float64),
    )
    n = BOX // 2 + 1
    tau2 = torch.full((n,), 1e6, dtype=torch.float64)
    tau2_cut = tau2.clone()
    tau2_cut[6:] = 0.0
    ref = reconstruct(bp, tau2, gridding_iterations=gridding)
    assert ref.abs().max() > 0
    cut = reconstruct(bp, tau2_cut, gridding_iterations=gridding)
    tol = 1e-9 if gridding == 0 else 0.05  # gridding: 0.018 measured (RELION 3.1 alike)
    assert float((cut - ref).norm() / ref.norm()) < tol


def test_windowed_m_step_equals_the_whole_grid_with_nothing_beyond_the_window():
    """With max_shell < d/2 the M-step works on the cube about the origin that holds the window: its map and noise
    power must be those of the whole-grid path (max_shell = d/2) on accumulators that are empty beyond the window."""
    from cryorefine.reconstruction.reconstruct import reconstruct

    s, P, n = 5, BOX * PAD, BOX // 2 + 1
    g = torch.Generator().manual_seed(1)
    data = torch.complex(
        torch.randn(P, P, P // 2 + 1, generator=g, dtype=torch.float64),
        torch.randn(P, P, P // 2 + 1, generator=g, dtype=torch.float64),
    )
    weight = torch.rand(P, P, P // 2 + 1, generator=g, dtype=torch.float64) + 0.1
    r_pad, _ = padded_shell_index(P, PAD)
    beyond = r_pad > s * PAD
    whole = BackProjector(data.masked_fill(beyond, 0), weight.masked_fill(beyond, 0), BOX, PAD)
    tau2 = torch.linspace(2.0, 0.5, n, dtype=torch.float64)
    tau2[s + 1 :] = 0.0
    # the division path (gridding iterations run on the whole grid anyway, and their window is the radius itself)
    ref = reconstruct(whole, tau2, max_shell=None, gridding_iterations=0)
    got = reconstruct(BackProjector(data, weight, BOX, PAD), tau2, max_shell=s, gridding_iterations=0)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12 * ref.abs().max().item())
    noise = reconstruction_noise_power(BackProjector(data, weight, BOX, PAD), n, max_shell=s)
    noise_ref = reconstruction_noise_power(whole, n, max_shell=None)
    torch.testing.assert_close(noise[:s], noise_ref[:s], rtol=1e-12, atol=0)  # shell s: the window keeps R < s·pad only
