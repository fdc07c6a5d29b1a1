"""Local-search candidates (batched on the device) against a per-particle numpy reference of RELION's rule."""

import numpy as np
import pytest
import torch

from cryorefine.estep.poses import NEAR_MIN_ORDER, PoseGrid
from cryorefine.geometry.healpix import directions_within, make_sampling


def reference_sets(grid, rot, tilt, psi, sigma, cutoff=3.0):
    """Per particle {coarse id: normalised log prior}: directions and psi strictly within cutoff·σ (else the
    nearest)."""
    s = grid.sampling
    dmask, dang = directions_within(s.order, rot, tilt, cutoff * sigma, s.sym_matrices, ipix=s.ipix)
    out = []
    for i in range(len(rot)):
        dpsi = (s.psi_deg - psi[i] + 180.0) % 360.0 - 180.0
        pmask = np.abs(dpsi) < cutoff * sigma
        if not pmask.any():
            pmask[np.abs(dpsi).argmin()] = True
        dd, pp = np.flatnonzero(dmask[i]), np.flatnonzero(pmask)
        lp = (-(dang[i, dd][:, None] ** 2) - dpsi[pp][None, :] ** 2) / (2 * sigma**2)
        lp = lp - np.log(np.exp(lp - lp.max()).sum()) - lp.max()
        out.append(dict(zip((dd[:, None] * s.n_psi + pp[None, :]).ravel().tolist(), lp.ravel().tolist())))
    return out


# orders >= NEAR_MIN_ORDER search the children of nearby coarser pixels; sigma 0.2° at order 5: no direction within
# the cutoff for most particles, the nearest one then comes from the comparison with all directions
@pytest.mark.parametrize(
    "order,sym,sigma",
    [
        (3, "C1", 7.5),
        (3, "C1", 0.5),
        (3, "D2", 10.0),
        (5, "C1", 1.875),
        (4, "D2", 3.75),
        (5, "C4", 1.0),
        (4, "O", 5.0),
        (5, "C1", 0.2),
    ],
)
def test_local_candidates_match_the_per_particle_rule(order, sym, sigma, monkeypatch):
    compared_with_all = []
    every = PoseGrid._direction_angles
    monkeypatch.setattr(
        PoseGrid, "_direction_angles", lambda self, va, vb: compared_with_all.append(len(vb)) or every(self, va, vb)
    )
    grid = PoseGrid.build(make_sampling(order, sym, 0.3), 1.25, 0.5)
    rng = np.random.default_rng(4)
    n = 64
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    ids, lp, ok = grid.local_candidates(rot, tilt, psi, sigma)
    ref = reference_sets(grid, rot, tilt, psi, sigma)
    assert ids.shape[1] == max(len(r) for r in ref)  # padded to the largest set, no wider
    for i in range(n):
        got = {int(c): float(p) for c, p, v in zip(ids[i], lp[i], ok[i]) if v}
        assert set(got) == set(ref[i])
        assert max(abs(got[c] - ref[i][c]) for c in got) < 1e-5
    if sigma < 1 and order == 3:  # narrower than the grid: the single nearest orientation
        assert (ok.sum(1) == 1).all()
    # the search near each particle served the batch, not the fallback to all directions (which alone would pass),
    # but where some particle has no direction within the cutoff
    assert bool(compared_with_all) == (order < NEAR_MIN_ORDER or sigma <= 0.5)


def test_a_batch_searched_in_pieces_gives_the_same_sets(monkeypatch):
    """local_candidates in pieces of LOCAL_CANDIDATE_ROWS particles, each padded to the widest piece: the same ids,
    priors and validity as in one piece."""
    from cryorefine.estep import poses

    grid = PoseGrid.build(make_sampling(4, "C1", 0.3), 1.25, 0.5)
    rng = np.random.default_rng(7)
    n = 50
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    sigma = rng.uniform(2.0, 6.0)
    whole = grid.local_candidates(rot, tilt, psi, sigma)
    monkeypatch.setattr(poses, "LOCAL_CANDIDATE_ROWS", 16)  # 16, 16, 16 and 2 particles
    pieces = grid.local_candidates(rot, tilt, psi, sigma)
    for a, b in zip(whole, pieces):
        assert a.shape == b.shape and a.dtype == b.dtype
    ok = whole[2]
    assert torch.equal(ok, pieces[2]) and torch.equal(whole[0][ok], pieces[0][ok])
    assert torch.equal(whole[1], pieces[1])  # -inf where not valid, in both
