"""The two rules RELION's BackProjector::reconstruct ends with, against literal per-voxel loops written from RELION's
definitions: the weight floor (1/1000 of each shell's mean weight, the path without gridding iterations) and
softMaskOutsideMap (corners outside the inscribed sphere to their mean, 3 px raised cosine)."""

import math

import numpy as np
import pytest
import torch

from cryorefine.fourier.filters import soft_mask_outside_map
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.reconstruct import padded_shell_index, reconstruct, weight_floor


def loop_soft_mask_outside_map(vol: np.ndarray, width: float = 3.0, radius: float | None = None) -> np.ndarray:
    d = vol.shape[0]
    radius = d / 2.0 if radius is None else radius
    outer = radius + width
    c = d // 2
    total, bg = 0.0, 0.0
    for idx in np.ndindex(vol.shape):
        r = math.sqrt(sum((i - c) ** 2 for i in idx))
        if r < radius:
            continue
        w = 1.0 if r > outer else 0.5 + 0.5 * math.cos(math.pi * (outer - r) / width)
        total += w
        bg += w * vol[idx]
    bg /= total
    out = vol.copy()
    for idx in np.ndindex(vol.shape):
        r = math.sqrt(sum((i - c) ** 2 for i in idx))
        if r < radius:
            continue
        w = 1.0 if r > outer else 0.5 + 0.5 * math.cos(math.pi * (outer - r) / width)
        out[idx] = (1 - w) * vol[idx] + w * bg
    return out


@pytest.mark.parametrize("box", [10, 11])
def test_soft_mask_outside_map_matches_relions_loop(box):
    vol = np.random.default_rng(box).normal(size=(box, box, box)) + 3.0
    ours = soft_mask_outside_map(torch.from_numpy(vol)).numpy()
    np.testing.assert_allclose(ours, loop_soft_mask_outside_map(vol), rtol=0, atol=1e-12)
    assert not np.allclose(ours, vol)  # negative control: the corners did change


def test_soft_mask_outside_map_on_a_batch_of_images():
    """The E-step's particle mask (--zero_mask: the background mean of each image)."""
    imgs = np.random.default_rng(3).normal(size=(3, 12, 12)) + np.arange(3)[:, None, None]
    ours = soft_mask_outside_map(torch.from_numpy(imgs), 4.0, 5.0, ndim=2).numpy()
    for i in range(3):
        np.testing.assert_allclose(ours[i], loop_soft_mask_outside_map(imgs[i], 5.0, 4.0), atol=1e-12)


def loop_weight_floor(weight: np.ndarray, pad: int, r_max: int) -> np.ndarray:
    """RELION's loop over the padded half transform (frequencies kp, ip, jp; ours centred: index - P//2)."""
    P = weight.shape[0]
    radavg, counter = np.zeros(r_max), np.zeros(r_max)
    round_max_r2 = int(r_max * pad * r_max * pad + 0.5)
    for a in range(P):
        for b in range(P):
            for c in range(P // 2 + 1):
                r2 = (a - P // 2) ** 2 + (b - P // 2) ** 2 + c * c
                if r2 < round_max_r2:
                    ires = int(math.floor(math.sqrt(r2) / pad))
                    radavg[ires] += weight[a, b, c]
                    counter[ires] += 1
    radavg /= 1000.0 * counter
    out = np.zeros_like(weight)
    for a in range(P):
        for b in range(P):
            for c in range(P // 2 + 1):
                r2 = (a - P // 2) ** 2 + (b - P // 2) ** 2 + c * c
                ires = int(math.floor(math.sqrt(r2) / pad))
                out[a, b, c] = radavg[min(ires, r_max - 1)]
    return out


@pytest.mark.parametrize("box, r_max", [(8, 4), (9, 3)])
def test_weight_floor_matches_relions_loop(box, r_max):
    pad = 2
    P = box * pad
    w = np.random.default_rng(0).uniform(0, 5, size=(P, P, P // 2 + 1))
    w[w < 1.0] = 0.0  # voxels without data count in the mean
    r_pad, _ = padded_shell_index(P, pad)
    ours = weight_floor(torch.from_numpy(w), r_pad, pad, r_max).numpy()
    np.testing.assert_allclose(ours, loop_weight_floor(w, pad, r_max), rtol=1e-12)


def test_reconstruction_floors_a_starved_voxel_and_masks_the_corners():
    """One voxel that a single slice barely reached (weight 1e-9 of the others) must not dominate the map: RELION
    divides it by 1/1000 of its shell's mean weight, not by its own weight. The map's corners are their mean."""
    box, pad = 16, 2
    P = box * pad
    bp = BackProjector.zeros(box, pad, dtype=torch.float64)
    r_pad, _ = padded_shell_index(P, pad)
    inside = r_pad <= box // 2 * pad
    g = torch.Generator().manual_seed(1)
    bp.weight[inside] = 1.0
    bp.data[inside] = torch.randn(int(inside.sum()), generator=g, dtype=torch.float64).to(torch.complex128) * 0.01
    starved = (P // 2 + 6, P // 2 + 3, 5)
    bp.weight[starved] = 1e-9
    bp.data[starved] = 1e-9 * 1e6  # data/weight = 1e6 there; with the floor (~1e-3 of the mean weight) about 1e-3
    vol = reconstruct(bp)
    assert float(vol.abs().max()) < 1.0, "the starved voxel's plane wave dominates: no weight floor"
    c = box // 2
    k = torch.arange(box, dtype=torch.float64) - c
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    corners = r > box / 2 + 3
    # the gridding correction divides the constant corners by sinc²: undo it to compare
    from cryorefine.projection.extract import sinc2_gridding_kernel

    flat = (vol * sinc2_gridding_kernel(box, pad, vol.device, vol.dtype))[corners]
    assert float(flat.std()) < 1e-12 * max(1.0, float(flat.abs().mean()))
