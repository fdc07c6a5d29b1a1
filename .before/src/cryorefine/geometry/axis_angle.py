"""Axis-angle (rotation vector) rotations: direction = axis, length = angle in radians."""

from __future__ import annotations

import numpy as np


def axis_angle_to_matrix(v) -> np.ndarray:
    """Active rotation matrices (n, 3, 3), float64, of rotation vectors v (n, 3) in radians (Rodrigues' formula)."""
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    theta = np.linalg.norm(v, axis=1)
    # the axis of a zero rotation is arbitrary: any unit vector gives the identity
    u = np.divide(v, theta[:, None], out=np.tile([0.0, 0.0, 1.0], (len(v), 1)), where=theta[:, None] > 0)
    K = np.zeros((len(v), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -u[:, 2], u[:, 1], -u[:, 0]
    K[:, 1, 0], K[:, 2, 0], K[:, 2, 1] = u[:, 2], -u[:, 1], u[:, 0]
    s, c = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    return np.eye(3) + s * K + (1 - c) * (K @ K)
