"""model.star's Fourier completeness against RELION's loops written out voxel by voxel (backprojector.cpp
updateSSNRarrays; ml_model.cpp calculateTotalFourierCoverage), in plain Python on a small grid.

Per shell: the fraction of the padded voxels with r² < round(r_max·pad)² and shell round(√r² / pad) whose
weight·pad³·T·τ²(shell) is at least 1. Overall: the shells' completeness averaged over the integer frequencies of
the cube |k_i| <= maxres − 1 with ⌊|k|⌋ <= maxres, maxres the last shell before the SSNR drops below 1.
(Pad 3: √r²/pad never lies half-way between two shells, where our rounding and RELION's would differ.)
"""

import math

import numpy as np
import pytest
import torch

from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.reconstruct import _cube_shell_counts, fourier_completeness, overall_completeness

BOX, PAD, FUDGE = 16, 3, 2.0


def radial_weight(r_pad: float) -> float:
    return 40.0 * math.exp(-r_pad / 6.0)  # falls with resolution, as a real data set's


def backprojector() -> BackProjector:
    bp = BackProjector.zeros(BOX, PAD, dtype=torch.float64)
    n, c = bp.size, bp.size // 2
    for z in range(n):
        for y in range(n):
            for x in range(bp.weight.shape[2]):
                r = math.sqrt((z - c) ** 2 + (y - c) ** 2 + x**2)
                # the x = 0 plane is summed with its Friedel mates before use: half here, the same radius there
                bp.weight[z, y, x] = radial_weight(r) / (2 if x == 0 else 1)
    return bp


def relion_completeness(tau2: np.ndarray, r_max: int) -> np.ndarray:
    n_sh = BOX // 2 + 1
    hits, count = np.zeros(n_sh), np.zeros(n_sh)
    size = BOX * PAD
    max_r2 = round(r_max * PAD) ** 2
    for k in range(-(size // 2), size - size // 2):
        for i in range(-(size // 2), size - size // 2):
            for j in range(0, size // 2 + 1):
                r2 = k * k + i * i + j * j
                if r2 >= max_r2:
                    continue
                ires = int(math.floor(math.sqrt(r2) / PAD + 0.5))
                w = radial_weight(math.sqrt(r2))
                ratio = w * PAD**3 * FUDGE * tau2[ires] if tau2[ires] > 0 else 0.001 * w * w
                hits[ires] += ratio >= 1
                count[ires] += 1
    return np.where(count > 0, hits / np.maximum(count, 1), 0.0)


def relion_total(completeness: np.ndarray, ssnr: np.ndarray) -> float:
    maxres = 0
    for ires in range(len(ssnr)):
        if ssnr[ires] < 1:
            break
        maxres = ires
    window = 2 * maxres - 1
    first = -int(window / 2)  # FIRST_XMIPP_INDEX: C's division truncates towards zero
    total, count = 0.0, 0
    for k in range(first, first + window):
        for i in range(first, first + window):
            for j in range(first, first + window):
                r = int(math.sqrt(k * k + i * i + j * j))
                if r <= maxres:
                    total += completeness[r]
                    count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("r_max", [5, BOX // 2])
def test_completeness_per_shell_is_relions(r_max):
    tau2 = 1.0 / (FUDGE * PAD**3 * 40.0 * np.exp(-np.arange(BOX // 2 + 1) * PAD / 6.0) * np.linspace(1.5, 0.3, 9))
    tau2[7] = 0.0  # RELION's stand-in prior where τ² is 0
    ours = fourier_completeness(backprojector(), torch.from_numpy(tau2), FUDGE, BOX // 2 + 1, r_max).numpy()
    reference = relion_completeness(tau2, r_max)
    print(np.round(reference, 3))
    assert ((reference > 0) & (reference < 1)).sum() >= 2  # shells part covered: the test can tell
    np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_overall_completeness_is_relions():
    rng = np.random.default_rng(0)
    completeness = rng.uniform(0.3, 1.0, BOX // 2 + 1)
    for ssnr in ([9, 5, 3, 2, 1.5, 0.8, 2, 0.1, 0], [9] * 9, [0.5] * 9, [9, 0.5] + [0] * 7, [9, 9, 0.5] + [0] * 6):
        ssnr = np.array(ssnr, dtype=float)
        assert overall_completeness(completeness, ssnr) == pytest.approx(relion_total(completeness, ssnr), abs=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 17, 44])
def test_cube_shell_counts_are_the_cubes(m):
    """overall_completeness's count of the cube's integer frequencies per shell, against the whole cube counted."""
    k = np.arange(-(m - 1), m)
    r = np.floor(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int).ravel()
    cube = np.bincount(r[r <= m], minlength=m + 1)
    np.testing.assert_array_equal(_cube_shell_counts(m).numpy(), cube)
