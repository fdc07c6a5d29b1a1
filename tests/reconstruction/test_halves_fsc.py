"""halves_fsc (RELION's compareTwoHalves: the FSC of the half sets' downsampled Fourier averages) against a literal
per-voxel loop written from RELION's definitions (BackProjector::getDownsampledAverage and
calculateDownSampledFourierShellCorrelation), and against the FSC of reconstructed maps on simulated data."""

import math

import numpy as np
import pytest
import torch

from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.fsc import fsc_curve, halves_fsc, resolution_shell
from cryorefine.reconstruction.reconstruct import reconstruct


def relion_round(x: float) -> int:
    return int(x + 0.5) if x > 0 else int(x - 0.5)


def loop_fsc(d1, w1, d2, w2, box, pad, r_max):
    P = box * pad
    avgs = []
    for data, weight in ((d1, w1), (d2, w2)):
        sums, wsum = {}, {}
        for a in range(P):
            for b in range(P):
                for c in range(P // 2 + 1):
                    key = (relion_round((a - P // 2) / pad), relion_round((b - P // 2) / pad), relion_round(c / pad))
                    sums[key] = sums.get(key, 0) + complex(data[a, b, c])
                    wsum[key] = wsum.get(key, 0.0) + float(weight[a, b, c])
        avgs.append({k: (sums[k] / wsum[k] if wsum[k] > 0 else 0j) for k in sums})
    n = box // 2 + 1
    num, den1, den2 = np.zeros(n), np.zeros(n), np.zeros(n)
    for key, z1 in avgs[0].items():
        R = math.sqrt(sum(v * v for v in key))
        if R > r_max:
            continue
        i = relion_round(R)
        z2 = avgs[1][key]
        num[i] += (z1 * z2.conjugate()).real
        den1[i] += abs(z1) ** 2
        den2[i] += abs(z2) ** 2
    fsc = np.where(den1 * den2 > 0, num / np.sqrt(np.maximum(den1 * den2, 1e-300)), 0.0)
    fsc[0] = 1.0
    return fsc


@pytest.mark.parametrize("box, r_max", [(12, 6), (12, 4), (10, 3)])
def test_halves_fsc_matches_relions_voxel_loop(box, r_max):
    pad = 2
    P = box * pad
    g = torch.Generator().manual_seed(box + r_max)
    shape = (P, P, P // 2 + 1)
    common = torch.randn(shape, dtype=torch.complex128, generator=g)
    bps = []
    for _ in range(2):  # correlated halves: a common signal plus independent noise, weights with empty voxels
        w = torch.rand(shape, dtype=torch.float64, generator=g) * (
            torch.rand(shape, generator=g, dtype=torch.float64) > 0.2
        )
        d = (common + 0.8 * torch.randn(shape, dtype=torch.complex128, generator=g)) * w
        bps.append(BackProjector(d.to(torch.complex64), w.float(), box, pad))
    expect = loop_fsc(
        bps[0].data.numpy(), bps[0].weight.numpy(), bps[1].data.numpy(), bps[1].weight.numpy(), box, pad, r_max
    )
    got = halves_fsc(bps[0], bps[1], r_max).numpy()
    np.testing.assert_allclose(got, expect, atol=1e-5)  # sums in the accumulators' float32
    assert np.all(got[1 : r_max + 1] > 0.1) and np.all(
        got[r_max + 1 :] == 0
    )  # control: correlated inside r_max, empty beyond


def test_halves_fsc_follows_the_fsc_of_the_reconstructed_maps():
    """Two half sets of noisy central slices of one smooth random map (signal fading with resolution): the Fourier-space
    FSC and the FSC of the two unregularised reconstructions (the real-space tool) agree over the shells."""
    from cryorefine.fourier.grids import rfft_freqs_2d
    from cryorefine.geometry.euler import euler_to_matrix
    from cryorefine.projection.extract import extract_central_slices, prepare_padded_transform

    box, pad, n = 24, 2, 300
    g = torch.Generator().manual_seed(3)
    k2 = sum(torch.fft.fftfreq(box, dtype=torch.float64).reshape(s) ** 2 for s in ((-1, 1, 1), (1, -1, 1), (1, 1, -1)))
    vol = torch.fft.ifftn(
        torch.fft.fftn(torch.randn((box,) * 3, generator=g, dtype=torch.float64)) * torch.exp(-25 * k2)
    ).real
    t = prepare_padded_transform(vol, pad)
    ky, kx = (a.flatten() for a in rfft_freqs_2d(box, dtype=torch.float64))
    bps = []
    for _ in range(2):
        rot, psi = (torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180 for _ in range(2))
        tilt = torch.rad2deg(torch.acos(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1))
        A = euler_to_matrix(rot, tilt, psi)
        clean = extract_central_slices(t, A, ky, kx)
        noisy = clean + 4.0 * clean.abs().mean() * torch.randn(clean.shape, generator=g, dtype=torch.complex128)
        bp = BackProjector.zeros(box, pad, dtype=torch.float64)
        bp.insert(A, ky, kx, noisy, torch.ones_like(noisy.real))
        bps.append(bp)
    got = halves_fsc(bps[0], bps[1], box // 2)
    maps = fsc_curve(reconstruct(bps[0]), reconstruct(bps[1]))
    shells = slice(1, box // 2 - 1)
    assert got[shells].max() > 0.9 and got[shells].min() < 0.5  # the curve crosses the thresholds that matter
    assert (got[shells] - maps[shells]).abs().max() < 0.12, (got, maps)
    for threshold in (0.5, 0.143):  # where the schedule and the report read them: within a shell
        assert abs(resolution_shell(got, threshold) - resolution_shell(maps, threshold)) <= 1, threshold
