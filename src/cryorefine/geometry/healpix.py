"""RELION's HEALPix orientation sampling (src/healpix_sampling.cpp), numpy only.

Conventions a refinement engine must share with RELION:
* Directions are HEALPix pixel centres in NEST ordering at ``order`` (nside = 2**order),
  tilt = colatitude theta, rot = phi wrapped into (-180, 180] (checkDirection).
* Angular step = 360 / (6 nside) = 60 / 2**order degrees; psi samples are
  ipsi * 360 / ceil(360 / step), starting at 0 (no half-step offset), 6 * 2**order of them.
* Symmetry: directions outside RELION's geometric asymmetric unit are removed, then (if
  fewer than 4000 remain) a "seam" pass drops any direction lying within
  0.5 * max_pixrad of a symmetry image of an earlier kept one.
* Oversampling by q (adaptive_oversampling): each direction -> 4**q HEALPix children at
  order + q (enumerated fine-y outer, fine-x inner: for q = 1 that is NEST 4p..4p+3), each
  psi -> psi - step/2 + (0.5 + i) step / 2**q (q = 1: psi -/+ step/4). The oversampled
  orientation index is child_direction * 2**q + child_psi.
* Perturbation: per iteration r <- wrap(r + U(0.5 f, f), [-f, f]) (f = --perturb, default
  0.5); every orientation (coarse and fine) A becomes A @ E(d, d, d), d = r * coarse step,
  and every translation gets + r * coarse offset step in x and y.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cryorefine.errors import CryoInputError
from cryorefine.geometry.euler import euler_to_matrix, matrix_to_euler
from cryorefine.geometry.symmetry import parse_symmetry, symmetry_matrices, symmetry_name

_PI = 3.14159265358979323846
_HALFPI = 1.570796326794896619231321691639751442099
_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)
_SEAM_LIMIT = 4000  # RELION only cleans asymmetric-unit seams below this many directions


# ----------------------------------------------------------------------------- HEALPix NEST
# Morton (bit-interleaving) steps: a NEST index interleaves the bits of x (even) and y (odd). Five shifts and masks
# each way, where a loop over 31 bits took ~0.7 s per 3 million pixels (the children of HEALPix order 8, which the
# first order-8 iteration waited for).
_SPREAD_STEPS = (  # (shift, mask after it): bit k of a 32-bit value moves to bit 2k
    (16, 0x0000FFFF0000FFFF),
    (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F),
    (2, 0x3333333333333333),
    (1, 0x5555555555555555),
)


_COMPRESS_STEPS = (  # the same steps backwards: bit 2k moves to bit k
    (1, 0x3333333333333333),
    (2, 0x0F0F0F0F0F0F0F0F),
    (4, 0x00FF00FF00FF00FF),
    (8, 0x0000FFFF0000FFFF),
    (16, 0x00000000FFFFFFFF),
)


def _compress_bits(v: np.ndarray) -> np.ndarray:
    """Take the even bits of v (bit 2k -> bit k)."""
    v = np.asarray(v, dtype=np.int64) & 0x5555555555555555
    for shift, mask in _COMPRESS_STEPS:
        v = (v | (v >> shift)) & mask
    return v


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Bit k of v (< 2**32) to bit 2k."""
    v = np.asarray(v, dtype=np.int64) & 0xFFFFFFFF
    for shift, mask in _SPREAD_STEPS:
        v = (v | (v << shift)) & mask
    return v


def nest_to_xyf(order: int, ipix):
    ipix = np.asarray(ipix, dtype=np.int64)
    face = ipix >> (2 * order)
    p = ipix & ((1 << (2 * order)) - 1)
    return _compress_bits(p), _compress_bits(p >> 1), face


def xyf_to_nest(order: int, x, y, face) -> np.ndarray:
    x, y, face = (np.asarray(a, dtype=np.int64) for a in (x, y, face))
    return (face << (2 * order)) + (_spread_bits(x) | (_spread_bits(y) << 1))


def healpix_z_phi(order: int, ipix) -> tuple[np.ndarray, np.ndarray]:
    """cos(theta) and phi (radians, [0, 2pi)) of NEST pixel centres, with the arithmetic of
    Healpix_Base::pix2ang_z_phi (so boundary comparisons match RELION bit for bit)."""
    nside = 1 << order
    npix = 12 * nside * nside
    fact2 = 4.0 / npix
    fact1 = (nside << 1) * fact2
    ix, iy, face = nest_to_xyf(order, ipix)
    jr = (_JRLL[face] << order) - ix - iy - 1
    north, south = jr < nside, jr > 3 * nside
    nr = np.where(north, jr, np.where(south, 4 * nside - jr, nside))
    z = np.where(north, 1 - (nr * nr) * fact2, np.where(south, (nr * nr) * fact2 - 1, (2 * nside - jr) * fact1))
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    num = _JPLL[face] * nr + ix - iy + 1 + kshift
    jp = np.sign(num) * (np.abs(num) // 2)  # C integer division truncates toward zero
    jp = np.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = np.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp - (kshift + 1) * 0.5) * (_HALFPI / nr)
    return z.astype(np.float64), phi.astype(np.float64)


def max_pixrad(order: int) -> float:
    """Healpix_Base::max_pixrad: largest centre-to-corner angle (radians)."""
    nside = 1 << order

    def vec(z, phi):
        s = math.sqrt((1 - z) * (1 + z))
        return np.array([s * math.cos(phi), s * math.sin(phi), z])

    t1 = (1.0 - 1.0 / nside) ** 2
    va, vb = vec(2.0 / 3.0, _PI / (4 * nside)), vec(1 - t1 / 3, 0.0)
    return math.atan2(np.linalg.norm(np.cross(va, vb)), float(va @ vb))


def _rot_tilt_from_z_phi(z, phi):
    rot = phi * 180 / _PI
    tilt = np.arccos(z) * 180.0 / _PI
    rot = np.where(rot > 180.0, rot - 360.0, rot)  # checkDirection: rot in (-180, 180]
    return rot, tilt


def _read_only(*arrays: np.ndarray):
    for a in arrays:
        a.flags.writeable = False
    return arrays if len(arrays) > 1 else arrays[0]


@functools.lru_cache(maxsize=16)
def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot_deg, tilt_deg) of all 12*4**order pixels in NEST order, as RELION's
    getDirectionFromHealPix gives them (rot = phi in (-180, 180], tilt = theta). Cached (read-only arrays):
    auto-refine asks for the same order every iteration (order 7: 0.2 million directions)."""
    return _read_only(*_rot_tilt_from_z_phi(*healpix_z_phi(order, np.arange(12 << (2 * order)))))


def angular_step_deg(order: int) -> float:
    """RELION getAngularSampling: 360 / (6 * 2**order)."""
    return 360.0 / (6 * (1 << order))


def psi_angles_deg(order: int | None = None, psi_step_deg: float | None = None) -> np.ndarray:
    """In-plane samples: n = ceil(360 / step), psi_i = i * 360 / n (first sample at 0)."""
    if psi_step_deg is None:
        assert order is not None, "give an order or a psi step"
        psi_step_deg = angular_step_deg(order)
    step = float(psi_step_deg)
    n = math.ceil(360.0 / step - 1e-9)
    return np.arange(n) * (360.0 / n)


def direction_vectors(rot_deg, tilt_deg) -> np.ndarray:
    """Euler_angles2direction in numpy: (..., 3) unit vectors."""
    a = np.asarray(rot_deg, dtype=np.float64) * _PI / 180
    b = np.asarray(tilt_deg, dtype=np.float64) * _PI / 180
    return np.stack([np.sin(b) * np.cos(a), np.sin(b) * np.sin(a), np.cos(b)], -1)


# ----------------------------------------------------------------------------- asymmetric unit
_I_PLANES = np.array(
    [
        [0.0, 1.0, 0.0],
        [-0.4999999839058737, -0.8090170074556163, 0.3090169861701543],
        [0.4999999839058737, -0.8090170074556163, 0.3090169861701543],
    ]
)


def _planes_keep(v, normals, sign=1.0):
    n = np.asarray(normals, dtype=np.float64)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    return np.all(sign * (v @ n.T) >= 0, axis=1)  # sign=-1: RELION's "<= 0" tests (I4)


def _geometric_asu_mask(kind: str, n: int, rot, tilt, v) -> np.ndarray:
    """RELION removeSymmetryEquivalentPointsGeometric for the rotation groups."""
    if kind == "C":
        return (rot >= -180.0 / n) & (rot <= 180.0 / n)
    if kind == "D":
        if n == 1:
            return tilt <= 90.0
        return (rot >= -180.0 / n + 90.0) & (rot <= 180.0 / n + 90.0) & (tilt <= 90.0)
    if kind == "T":
        planes = [[-0.942809, 0.0, 0.0], [0.471405, 0.272165, 0.7698], [0.471404, 0.816497, 0.0]]
        return (((rot >= 90.0) & (rot <= 150.0)) | (rot == 0)) & _planes_keep(v, planes)
    if kind == "O":
        planes = [[0.0, -1.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]]
        return (((rot >= 45.0) & (rot <= 135.0) & (tilt <= 90.0)) | (rot == 0.0)) & _planes_keep(v, planes)
    if kind == "I2":
        return _planes_keep(v, _I_PLANES)
    if kind in ("I1", "I3"):
        A = euler_to_matrix(0.0, 90.0 if kind == "I1" else 31.7174745559, 0.0).numpy()
        return _planes_keep(v, _I_PLANES @ A.T)
    if kind == "I4":
        A = euler_to_matrix(0.0, -31.7174745559, 0.0).numpy()
        planes = (
            np.array(
                [
                    [0.0, 0.0, 1.0],
                    [0.187592467856686, -0.303530987314591, -0.491123477863004],
                    [0.187592467856686, 0.303530987314591, -0.491123477863004],
                ]
            )
            @ A.T
        )
        return _planes_keep(v, planes, sign=-1.0)
    raise ValueError(kind)


@functools.lru_cache(maxsize=16)
def asymmetric_unit_pixels(order: int, sym: str = "C1") -> np.ndarray:
    """NEST pixel indices RELION keeps for point group sym (HealpixSampling::setOrientations); cached, read-only."""
    kind, n = parse_symmetry(sym)
    ipix = np.arange(12 << (2 * order))
    rot, tilt = healpix_directions(order)
    v = direction_vectors(rot, tilt)
    keep = _geometric_asu_mask(kind, n, rot, tilt, v)
    ipix, v = ipix[keep], v[keep]
    if len(ipix) >= _SEAM_LIMIT:
        return _read_only(ipix)
    cos_max = math.cos((0.5 * math.degrees(max_pixrad(order))) * _PI / 180)
    S = symmetry_matrices(sym).numpy()
    images = np.einsum("gij,kj->gki", S, v)  # symmetry images of every candidate
    close = np.zeros((len(v), len(v)), dtype=bool)  # close[i, k]: i near an image of k
    for img in images:
        close |= (v @ img.T) > cos_max
    kept = np.zeros(len(v), dtype=bool)
    for i in range(len(v)):  # greedy in pixel order, as RELION does
        kept[i] = not np.any(close[i] & kept)
    return _read_only(ipix[kept])


# ----------------------------------------------------------------------------- sampling object
@dataclass
class HealpixSampling:
    order: int
    sym: str
    ipix: np.ndarray  # NEST pixel index at `order` of each retained direction
    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    random_perturbation: float = 0.0  # RELION's random_perturbation (fraction of a step)
    sym_matrices: torch.Tensor | None = field(default=None, repr=False)

    @property
    def directions(self) -> tuple[np.ndarray, np.ndarray]:
        return self.rot_deg, self.tilt_deg

    @property
    def angular_step_deg(self) -> float:
        return angular_step_deg(self.order)

    @property
    def psi_step_deg(self) -> float:
        return 360.0 / len(self.psi_deg)

    @property
    def n_directions(self) -> int:
        return len(self.ipix)

    @property
    def n_psi(self) -> int:
        return len(self.psi_deg)

    @property
    def n_rotations(self) -> int:
        return self.n_directions * self.n_psi


def make_sampling(
    order: int, sym: str = "C1", random_perturbation: float = 0.0, psi_step_deg: float | None = None
) -> HealpixSampling:
    """RELION's 3D orientation grid for healpix_order `order` restricted to sym's asymmetric unit."""
    ipix = asymmetric_unit_pixels(order, sym)
    if len(ipix) == 0:
        raise CryoInputError(
            f"healpix order {order} leaves no directions in the asymmetric unit of "
            f"{symmetry_name(sym)} (RELION fails here too); use a finer angular sampling"
        )
    rot, tilt = healpix_directions(order)
    return HealpixSampling(
        order,
        symmetry_name(sym),
        ipix,
        rot[ipix],
        tilt[ipix],
        psi_angles_deg(order, psi_step_deg),
        float(random_perturbation),
        symmetry_matrices(sym),
    )


def sampling_eulers(sampling: HealpixSampling, perturbed: bool = True) -> np.ndarray:
    """(n_dir * n_psi, 3) (rot, tilt, psi) degrees, direction-major: index = dir * n_psi + psi.
    Applies the sampling's random perturbation (as RELION's getOrientations) unless perturbed=False."""
    nd, npsi = sampling.n_directions, sampling.n_psi
    e = np.stack(
        [np.repeat(sampling.rot_deg, npsi), np.repeat(sampling.tilt_deg, npsi), np.tile(sampling.psi_deg, nd)], -1
    )
    if perturbed and sampling.random_perturbation != 0:
        e = perturb_eulers(e, sampling.random_perturbation, sampling.angular_step_deg)
    return e


# ----------------------------------------------------------------------------- oversampling
def child_directions(order: int, direction_index, oversampling: int = 1):
    """HEALPix children at order + oversampling of NEST pixels `direction_index` (any shape),
    in RELION's getOrientations order. Returns (ipix, rot_deg, tilt_deg), each (..., 4**q);
    for q = 1 the children are 4p, 4p+1, 4p+2, 4p+3."""
    p = np.asarray(direction_index, dtype=np.int64)
    f = 1 << oversampling
    dj, di = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")  # fine y outer, x inner
    # pixel (f·x + di, f·y + dj) of face at order + q: p's bits shifted up by 2q, the child's own interleaved below
    fine = (p[..., None] << (2 * oversampling)) + xyf_to_nest(0, di.ravel(), dj.ravel(), 0)
    rot, tilt = _rot_tilt_from_z_phi(*healpix_z_phi(order + oversampling, fine))
    return fine, rot, tilt


@functools.lru_cache(maxsize=8)
def all_child_directions(order: int, oversampling: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(rot_deg, tilt_deg), each (12·4**order, 4**q): child_directions of every NEST pixel at `order`; cached
    (read-only), as the fine pass asks for the same order's children every tile."""
    _, rot, tilt = child_directions(order, np.arange(12 << (2 * order)), oversampling)
    return _read_only(rot, tilt)


def child_psis(psi_deg, step_deg: float, oversampling: int = 1) -> np.ndarray:
    """RELION pushbackOversampledPsiAngles: (..., 2**q) psi - step/2 + (0.5 + i) step / 2**q
    (q = 1: psi - step/4, psi + step/4; no wrapping in 3D)."""
    n = 1 << oversampling
    psi = np.asarray(psi_deg, dtype=np.float64)[..., None]
    return psi - 0.5 * step_deg + (0.5 + np.arange(n)) * step_deg / n


def oversampled_eulers(
    order: int,
    direction_index,
    psi_deg,
    step_deg: float | None = None,
    oversampling: int = 1,
    random_perturbation: float = 0.0,
    child=None,
) -> np.ndarray:
    """Fine orientations of coarse (pixel, psi) pairs: (..., 8**q, 3) degrees, ordered
    child_direction-major then child_psi, as RELION's getOrientations (perturbation included). With ``child`` (...)
    (indices into those 8**q), only that child of each pair: (..., 3), perturbing only those (a batch's best samples:
    the perturbation's rotation matrices for all 8 children were ~20 ms of host time per 4,000 particles)."""
    step = angular_step_deg(order) if step_deg is None else step_deg
    _, rot, tilt = child_directions(order, direction_index, oversampling)  # (..., D)
    psis = child_psis(psi_deg, step, oversampling)  # (..., P)
    D, P = rot.shape[-1], psis.shape[-1]
    if child is None:
        e = np.stack(np.broadcast_arrays(rot[..., :, None], tilt[..., :, None], psis[..., None, :]), -1)
        e = e.reshape(e.shape[:-3] + (D * P, 3))
    else:
        c = np.asarray(child, dtype=np.int64)[..., None]
        e = np.stack(
            [np.take_along_axis(x, i, -1)[..., 0] for x, i in ((rot, c // P), (tilt, c // P), (psis, c % P))], -1
        )
    if random_perturbation != 0:
        e = perturb_eulers(e, random_perturbation, angular_step_deg(order))
    return e


# ----------------------------------------------------------------------------- local searches
def direction_angles_deg(rot_a, tilt_a, rot_b, tilt_b, sym_matrices=None) -> np.ndarray:
    """Angle (degrees) between directions a (P,) and b (N,) -> (P, N); with sym_matrices the
    minimum over symmetry images of b (as RELION's selectOrientationsWithNonZeroPriorProbability)."""
    va = direction_vectors(rot_a, tilt_a).reshape(-1, 3)
    vb = direction_vectors(rot_b, tilt_b).reshape(-1, 3)
    if sym_matrices is None:
        dots = va @ vb.T
    else:
        S = np.asarray(sym_matrices.cpu() if isinstance(sym_matrices, torch.Tensor) else sym_matrices, dtype=np.float64)
        dots = np.einsum("pi,gij,nj->pgn", va, S, vb).max(1)
    return np.degrees(np.arccos(np.clip(dots, -1.0, 1.0)))


def directions_within(order: int, rot_deg, tilt_deg, max_angle_deg: float, sym_matrices=None, ipix=None):
    """Directions within max_angle_deg of the prior direction(s) (rot_deg, tilt_deg).

    Searches the NEST pixels `ipix` at `order` (default: the whole sphere, or pass a
    sampling's .ipix). Scalar prior -> (idx, angle_deg) where idx indexes `ipix`;
    array prior (P,) -> (mask (P, N), angle_deg (P, N)). Use angle_deg for RELION's Gaussian
    prior exp(-angle^2 / (2 sigma^2)) with max_angle_deg = sigma_cutoff * sigma (default 3 sigma);
    RELION keeps angles strictly below the cutoff and, if none, the single nearest one."""
    rot_all, tilt_all = healpix_directions(order)
    if ipix is not None:
        rot_all, tilt_all = rot_all[ipix], tilt_all[ipix]
    ang = direction_angles_deg(rot_deg, tilt_deg, rot_all, tilt_all, sym_matrices)
    mask = ang < max_angle_deg
    none = ~mask.any(1)
    mask[none, ang[none].argmin(1)] = True
    if np.ndim(rot_deg) == 0 and np.ndim(tilt_deg) == 0:
        idx = np.flatnonzero(mask[0])
        return idx, ang[0, idx]
    return mask, ang


# ----------------------------------------------------------------------------- perturbation
def next_random_perturbation(previous: float, perturbation_factor: float, rng=None) -> float:
    """RELION resetRandomlyPerturbedSampling: r += U(0.5 f, f), then realWRAP into [-f, f]."""
    f = float(perturbation_factor)
    if f <= 0:
        return 0.0
    rng = np.random.default_rng() if rng is None else rng
    r = previous + rng.uniform(0.5 * f, f)
    if r > f:  # realWRAP(x, -f, f)
        r -= int((r - f) / (2 * f) + 1) * 2 * f
    elif r < -f:
        r -= int((r + f) / (2 * f) - 1) * 2 * f
    return r


def perturb_eulers(eulers_deg, random_perturbation: float, step_deg: float):
    """RELION getOrientations perturbation: A -> A @ E(d, d, d), d = random_perturbation * step_deg,
    for (..., 3) (rot, tilt, psi) degrees; numpy in -> numpy out, torch in -> torch out."""
    is_np = not isinstance(eulers_deg, torch.Tensor)
    e = torch.as_tensor(np.asarray(eulers_deg, dtype=np.float64)) if is_np else eulers_deg
    d = float(random_perturbation) * float(step_deg)
    if d == 0:
        return eulers_deg
    A = euler_to_matrix(e[..., 0], e[..., 1], e[..., 2]) @ euler_to_matrix(d, d, d).to(e)
    out = torch.stack(matrix_to_euler(A), -1)
    return out.numpy() if is_np else out
