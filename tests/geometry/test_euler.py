import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryorefine.geometry.euler import (
    angular_distance_deg,
    euler_direction,
    euler_to_matrix,
    matrix_to_euler,
    rotation_angle_deg,
)
from cryorefine.geometry.symmetry import symmetry_matrices


def test_analytic_matrices():
    # RELION's A = Rz(psi) Ry(tilt) Rz(rot) with passive (frame) rotations
    Rz90 = torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    Ry90 = torch.tensor([[0.0, 0, -1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)
    assert torch.allclose(euler_to_matrix(90.0, 0.0, 0.0), Rz90, atol=1e-15)
    assert torch.allclose(euler_to_matrix(0.0, 0.0, 90.0), Rz90, atol=1e-15)
    assert torch.allclose(euler_to_matrix(0.0, 90.0, 0.0), Ry90, atol=1e-15)
    assert torch.allclose(euler_to_matrix(0.0, 0.0, 0.0), torch.eye(3, dtype=torch.float64))


def test_against_scipy():
    # scipy's 'ZYZ' (upper case = intrinsic) gives the ACTIVE matrix Rz(rot) Ry(tilt) Rz(psi);
    # RELION's matrix is the passive (frame) version, i.e. its transpose:
    #   A_relion = Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T
    rng = np.random.default_rng(1)
    e = np.stack([rng.uniform(-180, 180, 200), rng.uniform(0, 180, 200), rng.uniform(-180, 180, 200)], 1)
    ref = np.transpose(Rotation.from_euler("ZYZ", e, degrees=True).as_matrix(), (0, 2, 1))
    A = euler_to_matrix(*torch.from_numpy(e).T)
    assert A.shape == (200, 3, 3)
    np.testing.assert_allclose(A.numpy(), ref, atol=1e-12)


def test_projection_direction_is_third_row():
    # A^T (0,0,1) is the 3D direction of the projection axis (RELION's Euler_angles2direction)
    rot, tilt, psi = torch.tensor([30.0, -120.0]), torch.tensor([40.0, 100.0]), torch.tensor([10.0, 200.0])
    A = euler_to_matrix(rot.double(), tilt.double(), psi.double())
    d = euler_direction(rot.double(), tilt.double())
    assert torch.allclose(A[:, 2, :], d, atol=1e-14)
    assert torch.allclose(A.transpose(-1, -2) @ torch.tensor([0.0, 0, 1], dtype=torch.float64), d, atol=1e-14)


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-9, 180 - 1e-9, 37.0, 90.0])
def test_round_trip(tilt):
    rng = np.random.default_rng(2)
    rot = torch.from_numpy(rng.uniform(-180, 180, 100))
    psi = torch.from_numpy(rng.uniform(-180, 180, 100))
    A = euler_to_matrix(rot, torch.full_like(rot, tilt), psi)
    r, t, p = matrix_to_euler(A)
    assert torch.allclose(euler_to_matrix(r, t, p), A, atol=1e-9)
    assert (t >= 0).all() and (t <= 180).all()
    if tilt in (0.0, 180.0):  # gimbal lock: RELION puts everything into psi
        assert (r == 0).all() and (t == tilt).all()


def test_round_trip_random_and_angles_recovered():
    rng = np.random.default_rng(3)
    e = torch.from_numpy(np.stack([rng.uniform(-179, 179, 500), rng.uniform(1, 179, 500), rng.uniform(-179, 179, 500)]))
    r, t, p = matrix_to_euler(euler_to_matrix(*e))
    assert torch.allclose(torch.stack([r, t, p]), e, atol=1e-9)


def test_dtype_follows_input():
    A = euler_to_matrix(torch.tensor([10.0]), torch.tensor([20.0]), torch.tensor([30.0]))
    assert A.dtype == torch.float32
    assert matrix_to_euler(A)[0].dtype == torch.float32


def test_angular_distance():
    e = torch.tensor([[10.0, 50.0, -30.0], [100.0, 120.0, 70.0]], dtype=torch.float64)
    A = euler_to_matrix(*e.T)
    assert torch.allclose(angular_distance_deg(A, A), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    R = torch.from_numpy(Rotation.from_rotvec([0, 0, math.radians(7.5)]).as_matrix())
    assert torch.allclose(angular_distance_deg(R @ A, A), torch.full((2,), 7.5, dtype=torch.float64))
    assert abs(rotation_angle_deg(torch.diag(torch.tensor([1.0, -1, -1], dtype=torch.float64))) - 180) < 1e-12
    # symmetry: pose A S is equivalent to A (RELION's Euler_apply_transf with L = I)
    S = symmetry_matrices("D7")
    B = A @ S[5]
    assert (angular_distance_deg(A, B) > 10).all()
    assert torch.allclose(angular_distance_deg(A, B, S), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    # batched broadcast
    assert angular_distance_deg(A[:, None], A[None], S).shape == (2, 2)
