import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryorefine.errors import CryoInputError
from cryorefine.geometry.symmetry import parse_symmetry, symmetry_matrices, symmetry_order

GROUPS = {
    "C1": 1,
    "C2": 2,
    "C5": 5,
    "C12": 12,
    "D2": 4,
    "D3": 6,
    "D7": 14,
    "T": 12,
    "O": 24,
    "I": 60,
    "I1": 60,
    "I2": 60,
    "I3": 60,
    "I4": 60,
}


def _contains(G, M, tol=1e-9):
    return bool((torch.abs(G - M).flatten(1).amax(1) < tol).any())


def _axis_rot(axis, deg):
    from scipy.spatial.transform import Rotation

    a = np.asarray(axis, float)
    return torch.from_numpy(Rotation.from_rotvec(a / np.linalg.norm(a) * np.radians(deg)).as_matrix())


@pytest.mark.parametrize("sym,order", GROUPS.items())
def test_group_properties(sym, order):
    G = symmetry_matrices(sym)
    assert G.dtype == torch.float64 and G.shape == (order, 3, 3)
    assert symmetry_order(sym) == order
    assert torch.equal(G[0], torch.eye(3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand_as(G)
    assert torch.allclose(G @ G.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(G), torch.ones(order, dtype=torch.float64), atol=1e-12)
    P = (G[:, None] @ G[None]).reshape(-1, 3, 3)  # closure
    d = torch.abs(P[:, None] - G[None]).flatten(2).amax(2)
    assert (d.amin(1) < 1e-9).all()
    assert (d.amin(1) < 1e-9).sum() == order * order  # every product found
    # distinct elements
    dd = torch.abs(G[:, None] - G[None]).flatten(2).amax(2) + torch.eye(order) * 9
    assert dd.min() > 1e-3


def test_axes_follow_relion():
    # Cn about z, Dn's 2-fold about x (symmetries.cpp: "rot_axis n 0 0 1", "rot_axis 2 1 0 0")
    assert _contains(symmetry_matrices("C4"), _axis_rot([0, 0, 1], 90))
    assert _contains(symmetry_matrices("D3"), _axis_rot([1, 0, 0], 180))
    assert _contains(symmetry_matrices("D3"), _axis_rot([0, 0, 1], 120))
    assert not _contains(symmetry_matrices("D3"), _axis_rot([0, 1, 0], 180))
    # T: 3-fold z, 2-fold (0, .816496, .577350); O: 3-fold (1,1,1), 4-fold z
    assert _contains(symmetry_matrices("T"), _axis_rot([0, 0, 1], 120))
    assert _contains(symmetry_matrices("T"), _axis_rot([0, 0.816496, 0.577350], 180), tol=1e-5)
    assert _contains(symmetry_matrices("O"), _axis_rot([1, 1, 1], 120))
    assert _contains(symmetry_matrices("O"), _axis_rot([0, 0, 1], 90))
    # I (= I2): 2-fold z, 5-fold (0.525731114, 0, 0.850650807), 3-fold (0, 0.356822076, 0.934172364)
    for s in ("I", "I2"):
        G = symmetry_matrices(s)
        assert _contains(G, _axis_rot([0, 0, 1], 180))
        assert _contains(G, _axis_rot([0.525731114, 0, 0.850650807], 72), tol=1e-7)
        assert _contains(G, _axis_rot([0, 0.356822076, 0.934172364], 120), tol=1e-7)
    assert _contains(symmetry_matrices("I1"), _axis_rot([1, 0, 0], 180))
    assert _contains(symmetry_matrices("I3"), _axis_rot([0, 0, 1], 72))
    assert _contains(symmetry_matrices("I4"), _axis_rot([0.8944271932547096, 0, 0.4472135909903704], 72), tol=1e-7)


def test_parse():
    assert parse_symmetry("c4") == ("C", 4)
    assert parse_symmetry(" D7 ") == ("D", 7)
    assert parse_symmetry("i") == ("I2", 0)
    assert parse_symmetry("o") == ("O", 0)
    for bad in ("X9", "C0", "C", "D123", "I5", "", "C2v"):
        with pytest.raises(CryoInputError, match="unknown point group"):
            parse_symmetry(bad)
    with pytest.raises(CryoInputError, match=r"unknown point group 'X9'; use C<n>, D<n>, T, O or I"):
        symmetry_matrices("X9")


def _relion_ops(sym):
    out = subprocess.run(
        ["relion_refine", "--sym", sym, "--print_symmetry_ops"], capture_output=True, text=True, timeout=60
    ).stdout
    mats = []
    for block in re.split(r"R\(\d+\)=", out)[1:]:
        nums = [float(x) for x in block.split("Euler")[0].split()[:9]]
        mats.append(np.array(nums).reshape(3, 3))
    return np.stack(mats)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="needs RELION binaries")
@pytest.mark.parametrize("sym", ["C5", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_same_set_as_relion(sym):
    ref = torch.from_numpy(_relion_ops(sym))  # printed with ~5 significant digits
    G = symmetry_matrices(sym)
    assert len(ref) == len(G)
    assert torch.equal(ref[0], torch.eye(3, dtype=torch.float64))
    d = torch.abs(ref[:, None] - G[None]).flatten(2).amax(2)
    assert (d.amin(1) < 1e-4).all() and (d.amin(0) < 1e-4).all()
