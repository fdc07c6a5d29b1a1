"""PoseGrid.rotations: the matrices of chosen coarse ids, made without materialising the whole grid, against the
matrices of the grid's perturbed Euler angles (geometry.healpix.sampling_eulers, RELION's getOrientations order)."""

import numpy as np
import pytest
import torch

from cryorefine.estep.poses import PoseGrid
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.healpix import make_sampling, sampling_eulers


@pytest.mark.parametrize("order, sym, perturbation", [(2, "C1", 0.0), (2, "C1", 0.37), (3, "D2", -0.21)])
def test_rotations_of_ids_match_the_grid_eulers(order, sym, perturbation):
    grid = PoseGrid.build(make_sampling(order, sym, perturbation), 3.0, 1.5)
    ids = torch.as_tensor(np.random.default_rng(0).choice(grid.n_rotations, 500, replace=False))
    e = torch.as_tensor(sampling_eulers(grid.sampling))[ids]
    expect = euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    got = grid.rotations(ids).double()
    assert (got - expect).abs().max() < 1e-6
    # control: the unperturbed grid's matrices differ where the grid is perturbed
    if perturbation != 0:
        e0 = torch.as_tensor(sampling_eulers(grid.sampling, perturbed=False))[ids]
        assert (got - euler_to_matrix(e0[:, 0], e0[:, 1], e0[:, 2])).abs().max() > 1e-3
    assert "rotations" not in grid._cache  # nothing was made for the whole grid
    torch.testing.assert_close(grid.coarse_rotations[ids], grid.rotations(ids))


@pytest.mark.parametrize("order, sym, perturbation", [(2, "C1", 0.0), (3, "C1", 0.41), (3, "D2", -0.21)])
def test_fine_rotations_match_the_oversampled_eulers(order, sym, perturbation):
    """The device-side fine rotations against the host path's Euler angles (geometry.healpix.oversampled_eulers:
    child directions and psis in RELION's order, perturbed through a matrix round trip) turned into matrices."""
    grid = PoseGrid.build(make_sampling(order, sym, perturbation), 3.0, 1.5, dtype=torch.float64)
    ids = torch.as_tensor(np.random.default_rng(1).choice(grid.n_rotations, 300, replace=False))
    e = torch.as_tensor(grid.fine_eulers_deg(ids.numpy()))  # (300, 8, 3)
    expect = euler_to_matrix(e[..., 0], e[..., 1], e[..., 2])
    got = grid.fine_rotations(ids)
    assert got.shape == (300, 8, 3, 3)
    assert (got - expect).abs().max() < 1e-9
    # control: children taken in another order (psi-major) would not match
    swapped = got.reshape(300, 4, 2, 3, 3).transpose(1, 2).reshape(300, 8, 3, 3)
    assert (swapped - expect).abs().max() > 1e-3


@pytest.mark.parametrize("order, sym, perturbation", [(2, "C1", 0.0), (3, "C1", 0.41), (5, "D2", -0.21)])
def test_best_eulers_are_those_of_the_chosen_child(order, sym, perturbation):
    """A batch's best samples (coarse id, child): each the child's Euler angles among all 8 children's."""
    grid = PoseGrid.build(make_sampling(order, sym, perturbation), 3.0, 1.5)
    rng = np.random.default_rng(1)
    coarse, child = rng.integers(0, grid.n_rotations, 300), rng.integers(0, 8, 300)
    best = grid.best_eulers_deg(np.stack([coarse, child], 1))
    every = grid.fine_eulers_deg(coarse)  # (300, 8, 3)
    np.testing.assert_array_equal(best, every[np.arange(300), child])
    assert np.abs(best - every[np.arange(300), (child + 1) % 8]).max() > 1e-3  # the children differ
