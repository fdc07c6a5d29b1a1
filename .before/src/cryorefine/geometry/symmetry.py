"""Point-group rotation matrices in RELION's axis conventions (src/symmetries.cpp).

Generators ("rot_axis fold x y z" lines in RELION's fill_symmetry_class):
  Cn: n-fold about z.   Dn: n-fold about z + 2-fold about x.
  T : 3-fold about z + 2-fold about (0, sqrt(2/3), sqrt(1/3)).
  O : 3-fold about (1,1,1)/sqrt3 + 4-fold about z.
  I (= I2): 2-fold about z, 5-fold about (1,0,phi)/|.|, 3-fold about (0,1/phi,phi)/sqrt3
  I1, I3, I4: I2 turned about y (see _I_TURN_Y_DEG).
The group is the closure of the generators; identity comes first. A group contains each
element's inverse, so the list is the same set whichever way one reads RELION's
(transposed) R matrices. Symmetry-equivalent poses of a pose A are A @ S.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
import torch

from cryorefine.errors import CryoInputError

_PHI = (1 + math.sqrt(5)) / 2
# (fold, axis) per group, as in RELION's fill_symmetry_class
_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0, 0, 1)), (2, (0, math.sqrt(2 / 3), math.sqrt(1 / 3)))],
    "O": [(3, (1, 1, 1)), (4, (0, 0, 1))],
    "I2": [(2, (0, 0, 1)), (5, (1, 0, _PHI)), (3, (0, 1 / _PHI, _PHI))],
}
# I1, I3, I4 are I2 turned about y (exactly; RELION lists their axes to ~10 digits):
# I1: 2-fold x, 5-fold (phi,0,-1); I3: 2-fold (-1,0,phi), 5-fold z; I4: 2-fold (1,0,phi), 5-fold (2,0,1)
_I_TURN_Y_DEG = {"I1": 90.0, "I3": -math.degrees(math.atan2(1, _PHI)), "I4": math.degrees(math.atan2(1, _PHI))}
_HELP = "use C<n>, D<n>, T, O or I"


def parse_symmetry(sym: str) -> tuple[str, int]:
    """'c4' -> ('C', 4), 'D7' -> ('D', 7), 't' -> ('T', 0), 'I' -> ('I2', 0), 'I3' -> ('I3', 0).

    Case-insensitive like RELION; raises CryoInputError for anything else."""
    s = str(sym).strip().upper()
    m = re.fullmatch(r"([CD])(\d{1,2})", s)
    if m and int(m.group(2)) >= 1:
        return m.group(1), int(m.group(2))
    if s in ("T", "O"):
        return s, 0
    if s in ("I", "I1", "I2", "I3", "I4"):
        return ("I2" if s == "I" else s), 0
    raise CryoInputError(f"unknown point group '{sym}'; {_HELP}")


def symmetry_name(sym: str) -> str:
    """Canonical RELION spelling: 'c4' -> 'C4', 'i' -> 'I', 'I2' -> 'I2'."""
    kind, n = parse_symmetry(sym)
    s = str(sym).strip().upper()
    return f"{kind}{n}" if kind in "CD" else ("I" if s == "I" else kind)


def symmetry_order(sym: str) -> int:
    kind, n = parse_symmetry(sym)
    return {"C": n, "D": 2 * n, "T": 12, "O": 24}.get(kind, 60)


def _axis_rotation(axis, angle_deg: float) -> np.ndarray:
    """Active rotation by angle_deg about axis (Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    t = math.radians(angle_deg)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * (K @ K)


def _generators(kind: str, n: int):
    if kind in _I_TURN_Y_DEG:
        Q = _axis_rotation((0, 1, 0), _I_TURN_Y_DEG[kind])
        return [(fold, Q @ np.asarray(axis, dtype=np.float64)) for fold, axis in _GENERATORS["I2"]]
    if kind == "C":
        return [(n, (0, 0, 1))]
    if kind == "D":
        return [(n, (0, 0, 1)), (2, (1, 0, 0))]
    return _GENERATORS[kind]


def _unique(M: np.ndarray) -> np.ndarray:
    """Drop near-duplicates (max abs difference < 1e-6), keeping first occurrences in order."""
    same = np.abs(M[:, None] - M[None]).reshape(len(M), len(M), 9).max(-1) < 1e-6
    first = ~np.triu(same, 1).any(0)
    return M[first]


@lru_cache(maxsize=None)
def _group_numpy(kind: str, n: int) -> np.ndarray:
    mats = [np.eye(3)]
    for fold, axis in _generators(kind, n):
        mats += [_axis_rotation(axis, 360.0 * j / fold) for j in range(1, fold)]
    G = _unique(np.stack(mats))
    while True:  # closure: add all pairwise products until nothing new appears
        P = (G[:, None] @ G[None]).reshape(-1, 3, 3)
        known = (np.abs(P[:, None] - G[None]).reshape(len(P), len(G), 9).max(-1) < 1e-6).any(1)
        if known.all():
            break
        G = np.concatenate([G, _unique(P[~known])])
    U, _, Vt = np.linalg.svd(G)  # snap to exact rotations (inputs like I3's axes carry ~1e-16 noise)
    G = U @ Vt
    G[np.abs(G) < 1e-15] = 0.0
    return G


def symmetry_matrices(sym: str) -> torch.Tensor:
    """(G, 3, 3) float64 rotation matrices of the point group, identity first."""
    kind, n = parse_symmetry(sym)
    G = _group_numpy(kind, n)
    if G.shape[0] != symmetry_order(sym):
        raise AssertionError(f"group closure of {sym} gave {G.shape[0]} elements")
    return torch.from_numpy(G.copy())
