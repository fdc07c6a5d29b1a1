"""M-step rules of RELION's auto-refine against hand-computed values: --tau2_fudge applied twice in the regularised
half maps, the learned direction prior, and the initial σ² of images without --zero_mask."""

import numpy as np
import pytest
import torch

from cryorefine.mstep.noise import initial_sigma2
from cryorefine.mstep.priors import direction_log_prior, direction_prior
from cryorefine.mstep.tau2 import reconstruct_gold_standard
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.reconstruct import padded_shell_index


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_tau2_fudge_enters_twice(T):
    """Uniform weight w on every voxel: RELION's regularised voxel is data / (w + 1/(pad³·T·τ²)) with
    τ² = T·SSNR·σ²_rec and σ²_rec = 1/(pad³·w), i.e. data/w · T²·SSNR / (T²·SSNR + 1). With data at one voxel (shell 6)
    the map is one plane wave (every later step is linear), so the ratio of two reconstructions' amplitudes, at FSC 0.6
    and at 0.999, is the ratio of those factors; applying T once would give T·SSNR in their place."""
    box, pad = 16, 2
    P = box * pad
    w = 4.0
    bp = BackProjector.zeros(box, pad, dtype=torch.float64)
    r_pad, _ = padded_shell_index(P, pad)
    bp.weight[r_pad <= box // 2 * pad] = w
    bp.weight[:, :, 0] /= 2  # the x = 0 plane's conjugate pairs are summed (enforce_hermitian_x0): w after that
    fsc = torch.full((box // 2 + 1,), 0.6, dtype=torch.float64)
    ssnr = 0.6 / 0.4
    v = (P // 2, P // 2, 12)  # kx = 12 (padded): shell 6, regularised, off the x = 0 plane
    bp.data[v] = 1.0 * w
    # the division rule itself (without gridding iterations, whose density compensation is not exactly linear)
    regularised, _ = reconstruct_gold_standard(bp, fsc, T, max_shell=box // 2, gridding_iterations=0)
    plain, _ = reconstruct_gold_standard(bp, torch.full_like(fsc, 0.999), T, max_shell=box // 2, gridding_iterations=0)
    ratio = float(regularised.abs().max() / plain.abs().max())
    expected = (T * T * ssnr / (T * T * ssnr + 1)) / (T * T * 999.0 / (T * T * 999.0 + 1))
    assert ratio == pytest.approx(expected, rel=1e-6)
    assert (
        abs(ratio - (T * ssnr / (T * ssnr + 1)) / (T * 999.0 / (T * 999.0 + 1))) > 1e-3 or T == 1.0
    )  # T once: another value


def test_direction_prior_is_joint_and_reset_with_the_sampling():
    dw = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    p = direction_prior(dw)
    np.testing.assert_allclose(p.numpy(), dw.numpy() / 10.0)  # RELION: wsum_pdf_direction / sum_weight, no smoothing
    assert (
        torch.isinf(direction_log_prior(p, 3, local_search=False)[0, 2])
        or direction_log_prior(p, 3, False)[0, 2] < -600
    )
    assert direction_log_prior(p, 12, local_search=False) is None  # another HEALPix order: uniform again
    assert direction_log_prior(p, 3, local_search=True) is None  # local searches use the Gaussian prior instead


def test_initial_sigma2_without_zero_mask_is_the_noise_power(tmp_path):
    """Unit white noise: RELION's initial σ² is the noise power per component, box²/2 in our unnormalised transforms,
    when the images are not masked (no --zero_mask); masked, it is that times the mask's mean square (~0.4 here)."""
    from cryorefine.io.mrc import write_stack
    from cryorefine.io.particles import load_particles
    from cryorefine.io.star import write_star
    import pandas as pd

    box, n = 48, 300
    rng = np.random.default_rng(0)
    write_stack(tmp_path / "noise.mrcs", rng.normal(size=(n, box, box)).astype(np.float32), 1.0)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["g"],
            "rlnImagePixelSize": [1.0],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1}@noise.mrcs" for i in range(n)], "rlnOpticsGroup": 1})
    write_star(tmp_path / "p.star", {"optics": optics, "particles": parts})
    table = load_particles(tmp_path / "p.star", project_dir=tmp_path)
    unmasked = initial_sigma2(table, 1)[0, 0, 2 : box // 2].numpy() / (box * box / 2)
    masked = initial_sigma2(table, 1, mask_radius_angst=0.35 * box)[0, 0, 2 : box // 2].numpy() / (box * box / 2)
    assert np.abs(unmasked - 1).max() < 0.1
    assert masked.max() < 0.7  # the masked spectrum (what --zero_mask uses) is not the noise power
