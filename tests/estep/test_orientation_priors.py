"""Local searches with a prior per angle (--sigma_rot/--sigma_tilt/--sigma_psi) about the STAR's angle priors
(rlnAngleRot/Tilt/PsiPrior): PoseGrid.local_candidates against a per-particle float64 loop written from RELION 3.1's
HealpixSampling::selectOrientationsWithNonZeroPriorProbability (healpix_sampling.cpp 666-1040), and the centres the
E-step takes (io/particles.angle_priors)."""

import math

import numpy as np
import pandas as pd
import pytest

from cryorefine.estep.poses import PoseGrid
from cryorefine.geometry.healpix import direction_vectors, healpix_directions, make_sampling
from cryorefine.io.particles import angle_priors
from cryorefine.io.table import ParticleTable


def gaussian(x: float, sigma: float) -> float:
    return math.exp(-(x**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)  # RELION's gaussian1D


def orbit(v: np.ndarray, sym) -> list[np.ndarray]:
    """A direction and its images under the point group (RELION: L·(vᵀ·R)ᵀ with L = I)."""
    return [v] + ([] if sym is None else [np.asarray(R).T @ v for R in sym])


def delta_rot(v: np.ndarray, rot: float) -> float:
    """RELION's calculateDeltaRot: |asin| of y after rotating v by −rot about z."""
    a = math.radians(rot)
    return abs(math.degrees(math.asin(np.clip(-math.sin(a) * v[0] + math.cos(a) * v[1], -1, 1))))


def relion_selection(grid, rot, tilt, psi, sig_rot, sig_tilt, sig_psi, cutoff=3.0) -> dict[int, float]:
    """One particle's {coarse id: log prior}, RELION's loop in float64 (its fallback to the nearest sample, with the
    nearest found by the smallest distance)."""
    s = grid.sampling
    sym = None if s.sym_matrices is None else np.asarray(s.sym_matrices, dtype=np.float64)
    rot_all, tilt_all = healpix_directions(s.order)
    dirs = direction_vectors(rot_all[s.ipix], tilt_all[s.ipix])
    prior_dir = direction_vectors(rot, tilt)
    d_sel, best = {}, (math.inf, -1)
    for idir, v in enumerate(dirs):
        if sig_rot > 0 and sig_tilt > 0:
            sigma = max(sig_rot, sig_tilt)
            diff = min(math.degrees(math.acos(np.clip(u @ prior_dir, -1, 1))) for u in orbit(v, sym))
        elif sig_rot > 0:
            sigma, diff = sig_rot, min(delta_rot(u, rot) for u in orbit(v, sym))
        elif sig_tilt > 0:
            diffs = [abs(math.degrees(math.acos(np.clip(u[2], -1, 1))) - tilt) for u in orbit(v, sym)]
            sigma, diff = sig_tilt, min(abs(d - 360) if d > 180 else d for d in diffs)
        else:
            d_sel[idir] = 1.0
            continue
        if diff < cutoff * sigma:
            d_sel[idir] = gaussian(diff, sigma)
        best = min(best, (diff, idir))
    if not d_sel:
        d_sel[best[1]] = 1.0
    p_sel, best = {}, (math.inf, -1)
    for ipsi, a in enumerate(s.psi_deg):
        if sig_psi > 0:
            diff = abs(a - psi)
            diff = abs(diff - 360) if diff > 180 else diff
            if diff < cutoff * sig_psi:
                p_sel[ipsi] = gaussian(diff, sig_psi)
            best = min(best, (diff, ipsi))
        else:
            p_sel[ipsi] = 1.0
    if not p_sel:
        p_sel[best[1]] = 1.0
    zd, zp = sum(d_sel.values()), sum(p_sel.values())
    return {
        d * s.n_psi + p: math.log(wd / zd) + math.log(wp / zp) for d, wd in d_sel.items() for p, wp in p_sel.items()
    }


# (order, point group, σ rot, tilt, psi): both direction angles (the larger σ counts), rot alone (the plane through z),
# tilt alone with psi (filament-like: rot free), psi alone (every direction), narrower than the grid (the nearest)
CASES = [
    (3, "C1", 8.0, 4.0, 6.0),
    (2, "D2", 0.0, 0.0, 10.0),
    (2, "C4", 10.0, 0.0, 0.0),
    (2, "D2", 0.0, 9.0, 12.0),
    (3, "C1", 0.0, 6.0, 5.0),
    (4, "C1", 3.0, 3.0, 3.0),  # order 4: the search among nearby coarser pixels
    (3, "C1", 0.4, 0.4, 0.4),
]


@pytest.mark.parametrize("order,sym,sig_rot,sig_tilt,sig_psi", CASES)
def test_candidates_and_weights_match_relions_loop(order, sym, sig_rot, sig_tilt, sig_psi):
    grid = PoseGrid.build(make_sampling(order, sym, 0.3), 1.25, 0.5)
    rng = np.random.default_rng(order)
    n = 12
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    ids, lp, ok = grid.local_candidates(rot, tilt, psi, (sig_rot, sig_tilt, sig_psi))
    for i in range(n):
        expect = relion_selection(grid, rot[i], tilt[i], psi[i], sig_rot, sig_tilt, sig_psi)
        got = {int(c): float(p) for c, p, v in zip(ids[i], lp[i], ok[i]) if v}
        assert set(got) == set(expect), i
        assert max(abs(got[c] - expect[c]) for c in got) < 1e-5
    if max(sig_rot, sig_tilt, sig_psi) < 1:
        assert (ok.sum(1) == 1).all()  # narrower than the grid: the single nearest orientation


def test_one_sigma_is_all_three():
    """--sigma_ang (one σ) is the same search as that σ on each angle."""
    grid = PoseGrid.build(make_sampling(3, "D2", 0.1), 1.25, 0.5)
    rng = np.random.default_rng(1)
    rot, tilt, psi = rng.uniform(-180, 180, 20), rng.uniform(0, 180, 20), rng.uniform(-180, 180, 20)
    one, three = grid.local_candidates(rot, tilt, psi, 6.0), grid.local_candidates(rot, tilt, psi, (6.0, 6.0, 6.0))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(one, three))


def test_centres_are_the_priors_where_given():
    """Each angle's prior where the file has it, its 999 ("none") and absent columns falling back to the current
    angle (RELION's METADATA_*_PRIOR = 999 and the use of the angle itself)."""
    extra = pd.DataFrame({"rlnAngleTiltPrior": [90.0, 999.0, 45.0], "rlnAnglePsiPrior": [10.0, -20.0, 999.005]})
    table = ParticleTable.__new__(ParticleTable)
    table.extra = extra
    current = [np.array([1.0, 2.0, 3.0]) + k for k in (0, 10, 20)]
    rows = np.array([0, 1, 2])
    rot, tilt, psi = angle_priors(table, rows, *current)
    np.testing.assert_array_equal(rot, current[0])  # no rlnAngleRotPrior column
    np.testing.assert_array_equal(tilt, [90.0, 12.0, 45.0])
    np.testing.assert_array_equal(psi, [10.0, -20.0, 23.0])
    rot, tilt, psi = angle_priors(table, np.array([2]), *(c[[2]] for c in current))
    np.testing.assert_array_equal([tilt[0], psi[0]], [45.0, 23.0])


def test_the_offset_prior_is_centred_on_the_star_prior(tmp_path):
    """rlnOriginX/YPriorAngst centre the offset prior (RELION: not 0, not the previous offset): with noise images and
    a tight prior the E-step picks the searched offset nearest the centre; without a centre, the one nearest 0."""
    import dataclasses

    import torch

    from cryorefine.estep.fixed_poses import expectation_fixed_poses
    from cryorefine.estep.settings import EStepSettings
    from cryorefine.projection.extract import prepare_padded_transform
    from simulated_batch import simulated_batch

    box, angpix, n = 32, 4.0, 6
    truth, window, batch = simulated_batch(tmp_path, box, angpix, n, 10, 0.0, 3, 4.0)
    steps = torch.arange(-4.0, 5.0)
    moves = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)  # (81, 2) px
    settings = EStepSettings(sigma2_offset_angst2=0.01, angpix=angpix)
    refs = [prepare_padded_transform(truth.float(), 2)]
    centre = torch.tensor([[2.6, -1.2]]).expand(n, 2)
    for prior in (None, centre):
        b = dataclasses.replace(batch, offset_prior_px=prior)
        found = expectation_fixed_poses(b, window, refs, torch.eye(3).expand(n, 3, 3), torch.zeros(1), None, settings,
                                        moves).offsets_px  # fmt: skip
        target = torch.zeros(n, 2) if prior is None else prior
        candidates = batch.old_offset_px[:, None, :] + moves[None]  # (n, 81, 2)
        nearest = candidates[torch.arange(n), ((candidates - target[:, None, :]) ** 2).sum(-1).argmin(1)]
        torch.testing.assert_close(found, nearest)
