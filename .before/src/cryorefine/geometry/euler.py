"""RELION's Euler-angle convention (ZYZ, degrees) as batched torch code.

``A = euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``:
A = Rz(psi) Ry(tilt) Rz(rot) with *passive* (frame) rotations, i.e. the transpose of
the active intrinsic ZYZ rotation ``Rotation.from_euler('ZYZ', [rot, tilt, psi])``.
A rotates the reference into the particle view: the 2D Fourier pixel (x, y) of a
projection samples the 3D transform at ``A^T (x, y, 0)``; the viewing direction
(projection axis in the reference frame) is the third row of A,
(sin tilt cos rot, sin tilt sin rot, cos tilt).
"""

from __future__ import annotations

import math

import torch

_FLT_EPSILON = 1.1920928955078125e-07  # C's FLT_EPSILON, used by RELION's gimbal-lock test


def _as_tensor(x, like=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    dtype = like.dtype if isinstance(like, torch.Tensor) and like.is_floating_point() else torch.float64
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.as_tensor(x, dtype=dtype, device=device)


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> torch.Tensor:
    """RELION Euler_angles2matrix, batched: (...,) angles in degrees -> (..., 3, 3)."""
    like = next((a for a in (rot_deg, tilt_deg, psi_deg) if isinstance(a, torch.Tensor)), None)
    a, b, g = (_as_tensor(x, like) for x in (rot_deg, tilt_deg, psi_deg))
    if not a.is_floating_point():
        a, b, g = a.double(), b.double(), g.double()
    a, b, g = torch.broadcast_tensors(a, b, g)
    a, b, g = torch.deg2rad(a), torch.deg2rad(b), torch.deg2rad(g)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_euler(A: torch.Tensor):
    """RELION Euler_matrix2angles, batched: (..., 3, 3) -> (rot, tilt, psi) in degrees.

    tilt is in [0, 180]; rot, psi in (-180, 180]. When |sin tilt| <= 16*FLT_EPSILON
    (gimbal lock) RELION sets rot = 0 and puts the whole z-rotation into psi
    (tilt = 0 if A[2,2] >= 0 else 180)."""
    A = _as_tensor(A)
    if not A.is_floating_point():
        A = A.double()
    abs_sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * _FLT_EPSILON
    # regular case (RELION's sign_sb is always +1 given gamma = atan2(A12, -A02))
    psi = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    rot = torch.atan2(A[..., 2, 1], A[..., 2, 0])
    tilt = torch.atan2(abs_sb, A[..., 2, 2])
    # gimbal lock: rotation about z only
    up = A[..., 2, 2] >= 0
    zero = torch.zeros_like(rot)
    psi_lock = torch.where(up, torch.atan2(-A[..., 1, 0], A[..., 0, 0]), torch.atan2(A[..., 1, 0], -A[..., 0, 0]))
    tilt_lock = torch.where(up, zero, torch.full_like(rot, math.pi))
    rot = torch.where(regular, rot, zero)
    tilt = torch.where(regular, tilt, tilt_lock)
    psi = torch.where(regular, psi, psi_lock)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def euler_direction(rot_deg, tilt_deg) -> torch.Tensor:
    """RELION Euler_angles2direction: unit vector (..., 3) of the viewing direction (= row 2 of A)."""
    like = rot_deg if isinstance(rot_deg, torch.Tensor) else tilt_deg
    a, b = (_as_tensor(x, like) for x in (rot_deg, tilt_deg))
    if not a.is_floating_point():
        a, b = a.double(), b.double()
    a, b = torch.broadcast_tensors(torch.deg2rad(a), torch.deg2rad(b))
    return torch.stack([b.sin() * a.cos(), b.sin() * a.sin(), b.cos()], -1)


def rotation_angle_deg(R: torch.Tensor) -> torch.Tensor:
    """Rotation angle (degrees, [0, 180]) of rotation matrices (..., 3, 3), accurate near 0 and 180."""
    cos_t = (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2
    axis = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin_t = torch.linalg.vector_norm(axis, dim=-1) / 2
    return torch.rad2deg(torch.atan2(sin_t, cos_t))


def angular_distance_deg(A: torch.Tensor, B: torch.Tensor, sym_matrices: torch.Tensor | None = None) -> torch.Tensor:
    """Angle (degrees) of the rotation A B^T, minimised over symmetry-equivalent poses of B.

    RELION writes a symmetry-related pose as B S (Euler_apply_transf with L = I), S in the
    group, so the error is min_S angle(A S^T B^T). A, B: (..., 3, 3) broadcastable;
    sym_matrices: (G, 3, 3) or None (= C1). Returns (...)."""
    A, B = _as_tensor(A), _as_tensor(B)
    if sym_matrices is None:
        return rotation_angle_deg(A @ B.transpose(-1, -2))
    S = _as_tensor(sym_matrices).to(dtype=A.dtype, device=A.device)
    # angle(A S^T B^T) = angle(B^T A S^T): conjugate rotations have the same angle
    M = (B.transpose(-1, -2) @ A).unsqueeze(-3)  # (..., 1, 3, 3)
    return rotation_angle_deg(M @ S.transpose(-1, -2)).amin(-1)
