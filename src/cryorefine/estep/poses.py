"""The pose grid of one iteration: coarse rotations and translations, their fine children, local-search candidates.

Rotation ids: coarse id c = direction_row · n_psi + psi_row of the (perturbed) HEALPix grid; its fine
children are 8·c + k (k = child_direction·2 + child_psi, RELION's order). Translations: coarse id t of
the grid around each particle's previous offset; fine children 4·t + k (±step/4 in x and y).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry.euler import euler_to_matrix
from ..geometry.healpix import (
    HealpixSampling,
    all_child_directions,
    child_psis,
    direction_vectors,
    healpix_directions,
    max_pixrad,
    oversampled_eulers,
    sampling_eulers,
)
from ..geometry.translations import child_translations, perturb_translations_px, translation_grid_px
from ..projection.extract import extract_central_slices_planar
from ..transfer import to_device

CPU_PROJECTION_CACHE_BYTES = 1 << 30  # coarse projections kept between tiles on the CPU (coarse_projections)
N_ROT_CHILDREN = 8
N_TRANS_CHILDREN = 4
NEAR_LEVELS = (
    3  # local searches find a particle's directions among the children of HEALPix pixels this many orders coarser
)
LOCAL_CANDIDATE_ROWS = 1024  # particles per piece of a batch's local candidate search
NEAR_MIN_ORDER = 4  # below this order every direction is compared with every particle (at most 768 of them per image)


def _compact(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column ids of each row's True entries, first and in order: (ids (n, m), valid (n, m)), m the largest count
    (a cumulative-sum scatter: no sort). ``width``: that count where the caller has read it already (else read here,
    a wait for the device)."""
    count = mask.sum(1)
    m = int(count.max()) if width is None else width
    slot = torch.where(mask, mask.cumsum(1) - 1, m)  # False entries go to a spare column
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    ids = torch.zeros(len(mask), m + 1, dtype=torch.int64, device=mask.device).scatter_(1, slot, cols)[:, :m]
    return ids, torch.arange(m, device=mask.device)[None, :] < count[:, None]


def _set_widths(d_mask: torch.Tensor, p_mask: torch.Tensor) -> list[int]:
    """The widths of a batch's local candidate sets from its chosen directions d_mask (n, D') and psi angles p_mask
    (n, P), read from the device at once: [most directions, most psi angles, most (direction, psi) pairs, fewest
    directions] of any particle."""
    d, p = d_mask.sum(1), p_mask.sum(1)
    return torch.stack([d.max(), p.max(), (d * p).max(), d.min()]).tolist()


@dataclass
class PoseGrid:
    sampling: HealpixSampling
    translations_px: torch.Tensor  # (T, 2) coarse offsets relative to the previous offset, perturbed
    translation_children_px: torch.Tensor  # (4, 2)
    offset_step_px: float
    device: torch.device | str | None = None
    dtype: torch.dtype = torch.float32
    _cache: dict = field(default_factory=dict, repr=False)  # rotations, directions and psi angles on the device

    @classmethod
    def build(
        cls, sampling: HealpixSampling, offset_range_px: float, offset_step_px: float, device=None, dtype=torch.float32
    ) -> "PoseGrid":
        t = translation_grid_px(offset_range_px, offset_step_px)
        t = perturb_translations_px(t, sampling.random_perturbation, offset_step_px)
        return cls(
            sampling,
            t.to(device=device, dtype=dtype),
            child_translations(offset_step_px).to(device=device, dtype=dtype),
            offset_step_px,
            device,
            dtype,
        )

    @property
    def n_rotations(self) -> int:
        return self.sampling.n_directions * self.sampling.n_psi

    @property
    def n_translations(self) -> int:
        return self.translations_px.shape[0]

    @property
    def coarse_eulers_deg(self) -> np.ndarray:
        """(R, 3) (rot, tilt, psi) degrees of every coarse rotation, perturbed (made on first use)."""
        return self._once("eulers", lambda: sampling_eulers(self.sampling))

    @property
    def coarse_rotations(self) -> torch.Tensor:
        """(R, 3, 3) every coarse rotation (made on first use: global searches need them all)."""
        return self._once("rotations", lambda: self.rotations(torch.arange(self.n_rotations, device=self.device)))

    def coarse_projections(self, ref, k: int, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
        """(R, 2, j) planar projections of class ``k``'s reference ``ref`` at every coarse rotation (global searches).

        On the CPU they are kept for this grid's later tiles and batches against the same reference (one reference
        serves a whole half pass), up to CPU_PROJECTION_CACHE_BYTES: re-extracting them per tile was half of an
        order-3 iteration on 2 cores. On a GPU the extraction is a small share of a global pass (its GEMMs run at
        ~39 TFLOP/s) and the memory is better left to the tiles, so nothing is kept there."""
        cache = self._cache.setdefault("coarse_projections", {})  # k -> (reference, pixels, projections)
        j = (ky.numel(), ky.data_ptr(), kx.data_ptr())  # the pixels: another magnification's differ
        hit = cache.get(k)
        if hit is not None and hit[0] is ref and hit[1] == j:
            return hit[2]
        cache.pop(k, None)  # another half's or iteration's reference: freed before the new extraction
        p = extract_central_slices_planar(ref, self.coarse_rotations, ky, kx)
        kept = sum(v[2].numel() * v[2].element_size() for v in cache.values())
        if p.device.type == "cpu" and kept + p.numel() * p.element_size() <= CPU_PROJECTION_CACHE_BYTES:
            cache[k] = (ref, j, p)
        return p

    def rotations(self, ids: torch.Tensor) -> torch.Tensor:
        """(m, 3, 3) matrices of coarse rotation ids (m,), made for those ids only: local searches use a few per
        particle, and all of a fine grid would take seconds (HEALPix order 6: 37.7 million rotations).
        The grid's random perturbation is applied as RELION's getOrientations: R(rot, tilt, psi) · R(d, d, d)."""
        if "rotations" in self._cache:
            return self._cache["rotations"][ids]
        s = self.sampling
        rot, tilt, psi = self._coarse_angles()
        ids = ids.to(device=rot.device, dtype=torch.long)
        d, p = ids // s.n_psi, ids % s.n_psi
        return self._perturbed(euler_to_matrix(rot[d], tilt[d], psi[p])).to(self.dtype)

    def _once(self, key, make):
        """``make()``'s value, made once per grid under ``key`` (device copies of host arrays among them: a copy per
        batch or tile made the host wait for the device)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _device_angles(self, key: str, make) -> tuple[torch.Tensor, ...]:
        """The angle arrays (degrees) that ``make()`` returns, as float64 tensors on the grid's device, made once per
        grid under ``key``."""
        return self._once(
            key, lambda: tuple(torch.as_tensor(np.asarray(a, dtype=np.float64), device=self.device) for a in make())
        )

    def _coarse_angles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rot (D,), tilt (D,), psi (P,)) of the grid's directions and psi angles, on the device."""
        s = self.sampling
        rot, tilt, psi = self._device_angles("angles", lambda: (s.rot_deg, s.tilt_deg, s.psi_deg))
        return rot, tilt, psi

    def _perturbed(self, a: torch.Tensor) -> torch.Tensor:
        """RELION's getOrientations perturbation of matrices (..., 3, 3): A · R(d, d, d), d = perturbation × step."""
        step = float(self.sampling.random_perturbation) * float(self.sampling.angular_step_deg)
        if step == 0:
            return a
        key = ("perturbation", a.device, a.dtype)
        return a @ self._once(key, lambda: to_device(euler_to_matrix(step, step, step), a.device, a.dtype))

    def fine_eulers_deg(self, coarse_ids: np.ndarray, child: np.ndarray | None = None) -> np.ndarray:
        """(m, 8, 3) Euler angles (degrees) of the fine children of coarse rotation ids (m,); with ``child`` (m,), only
        that child of each: (m, 3)."""
        s = self.sampling
        d, p = coarse_ids // s.n_psi, coarse_ids % s.n_psi
        return oversampled_eulers(
            s.order, s.ipix[d], s.psi_deg[p], random_perturbation=s.random_perturbation, child=child
        )

    def best_eulers_deg(self, fine_pose: np.ndarray) -> np.ndarray:
        """(n, 3) Euler angles (degrees) of fine samples given as (coarse rotation id, child) rows (n, 2)."""
        coarse, child = np.asarray(fine_pose, dtype=np.int64).T
        return self.fine_eulers_deg(coarse, child)

    def fine_rotations(self, coarse_ids: torch.Tensor) -> torch.Tensor:
        """(m, 8, 3, 3) rotation matrices of the fine children of coarse ids (m,): the rotations of fine_eulers_deg,
        made on the grid's device in float64 from cached child directions (the host path took ~0.1 s per tile of a
        local search, with the device idle, waiting for it)."""
        s = self.sampling
        rot, tilt, dpsi = self._device_angles(
            "child_angles",
            lambda: (*(a[s.ipix] for a in all_child_directions(s.order)), child_psis(0.0, s.angular_step_deg)),
        )
        psi = self._coarse_angles()[2]
        ids = coarse_ids.to(device=rot.device, dtype=torch.long)
        d, p = ids // s.n_psi, ids % s.n_psi
        shape = (len(ids), rot.shape[1], dpsi.shape[0])  # (m, child direction, child psi): RELION's order
        a = euler_to_matrix(
            rot[d][:, :, None].expand(shape),
            tilt[d][:, :, None].expand(shape),
            (psi[p][:, None, None] + dpsi).expand(shape),
        )
        return self._perturbed(a).reshape(len(ids), -1, 3, 3).to(self.dtype)

    def fine_translations(self) -> torch.Tensor:
        """(T, 4, 2) fine offsets (relative to the previous offset) of every coarse translation."""
        return self.translations_px[:, None, :] + self.translation_children_px[None]

    def local_candidates(
        self,
        rot_deg: np.ndarray,
        tilt_deg: np.ndarray,
        psi_deg: np.ndarray,
        sigma_deg: float | tuple[float, float, float],
        sigma_cutoff: float = 3.0,
    ):
        """Coarse rotation ids near each particle's prior orientation (n,) with RELION's Gaussian prior
        (HealpixSampling::selectOrientationsWithNonZeroPriorProbability).

        ``sigma_deg``: the prior's σ of rot, tilt and psi in degrees (0: that angle is not restricted), or one σ for
        all three (--sigma_ang). Directions: with σ_rot and σ_tilt, those whose angle to the prior direction (its
        nearest symmetry image) is strictly below sigma_cutoff·σ, σ = max(σ_rot, σ_tilt), weighted exp(−Δ²/2σ²); with
        one of them, Δ is the angle out of the plane through z at the prior rot (calculateDeltaRot), or the
        difference of tilts, each the smallest over the symmetry images; with neither, every direction, uniform. Psi
        angles likewise with σ_psi. Where none is within the cutoff, the single nearest. The prior is normalised over
        each particle's set. Computed for the whole batch on the grid's device (a per-particle loop on the host took
        ~0.4 s per 1,000 particles).
        Returns (ids (n, L) int64, log_prior (n, L) float32, valid (n, L) bool), padded to the largest set.
        In pieces of LOCAL_CANDIDATE_ROWS particles: the search's (particles × directions) temporaries grow with the
        batch, which its memory budget (the images') does not count.
        """
        if len(rot_deg) <= LOCAL_CANDIDATE_ROWS:
            return self._local_candidates(rot_deg, tilt_deg, psi_deg, sigma_deg, sigma_cutoff)
        pieces = [slice(r, r + LOCAL_CANDIDATE_ROWS) for r in range(0, len(rot_deg), LOCAL_CANDIDATE_ROWS)]
        parts = [self._local_candidates(rot_deg[p], tilt_deg[p], psi_deg[p], sigma_deg, sigma_cutoff) for p in pieces]
        L = max(ids.shape[1] for ids, _, _ in parts)
        return tuple(
            torch.cat([F.pad(part[i], (0, L - part[i].shape[1]), value=fill) for part in parts])
            for i, fill in enumerate((0, -torch.inf, False))
        )

    def _local_candidates(self, rot_deg, tilt_deg, psi_deg, sigma_deg, sigma_cutoff):
        """local_candidates of up to LOCAL_CANDIDATE_ROWS particles."""
        s, dev = self.sampling, self.device
        sig_rot, sig_tilt, sig_psi = (sigma_deg,) * 3 if isinstance(sigma_deg, (int, float)) else sigma_deg
        va = to_device(direction_vectors(rot_deg, tilt_deg), dev).reshape(-1, 3)  # (n, 3)
        n = len(va)
        psi_all = self._coarse_angles()[2]
        dpsi = (
            torch.remainder(
                psi_all[None, :] - to_device(np.asarray(psi_deg, dtype=np.float64), dev)[:, None] + 180.0, 360.0
            )
            - 180.0
        )

        def chosen(dist: torch.Tensor, limit: float) -> torch.Tensor:
            """(n, N) bool: entries strictly below ``limit``, or the nearest one where none is."""
            dist = dist.abs()
            mask = dist < limit
            mask[torch.arange(len(mask), device=dev), dist.argmin(1)] |= ~mask.any(1)
            return mask

        def width(sigma: float) -> float:
            return sigma if sigma > 0 else torch.inf  # an unrestricted angle: every sample, a flat prior

        sig_dir = width(max(sig_rot, sig_tilt))  # RELION: the larger where both are given (no separate widths)
        max_angle = sigma_cutoff * sig_dir
        sig_p = width(sig_psi)
        p_mask = chosen(dpsi, sigma_cutoff * sig_p)
        widths = None
        if sig_rot > 0 and sig_tilt > 0 and s.order >= NEAR_MIN_ORDER:
            # the candidates near each particle (ascending ids, as below), and their angles
            cols, dir_ang, valid = self._directions_near(va, max_angle)
            d_mask = valid & (dir_ang < max_angle)
            widths = _set_widths(d_mask, p_mask)
            if widths[3] == 0:  # some particle has none within the cutoff: its nearest is found among all directions
                widths = None
        if widths is None:  # every direction against every particle
            if sig_rot > 0 and sig_tilt > 0:
                dir_ang = self._direction_angles(va, self._direction_vectors())  # (n, D)
            elif sig_rot > 0:
                dir_ang = self._out_of_rot_plane(to_device(np.asarray(rot_deg, dtype=np.float64), dev))
            elif sig_tilt > 0:
                dir_ang = self._tilt_differences(to_device(np.asarray(tilt_deg, dtype=np.float64), dev))
            else:
                dir_ang = torch.zeros(n, len(s.ipix), dtype=torch.float64, device=dev)
            cols, d_mask = None, chosen(dir_ang, max_angle)
            widths = _set_widths(d_mask, p_mask)
        pos, d_ok = _compact(d_mask, widths[0])
        d_ids, d_ang = pos if cols is None else cols.gather(1, pos), dir_ang.gather(1, pos)
        p_ids, p_ok = _compact(p_mask, widths[1])
        lp = -(d_ang**2)[:, :, None] / (2.0 * sig_dir**2) - (dpsi.gather(1, p_ids) ** 2)[:, None, :] / (2.0 * sig_p**2)
        ok = (d_ok[:, :, None] & p_ok[:, None, :]).reshape(n, -1)
        ids = (d_ids[:, :, None] * s.n_psi + p_ids[:, None, :]).reshape(n, -1)
        keep, ok = _compact(ok, widths[2])  # the valid (direction, psi) pairs to the front, the largest set's width
        ids = ids.gather(1, keep)
        lp = torch.where(ok, lp.reshape(n, -1).gather(1, keep), -torch.inf)
        lp = lp - torch.logsumexp(lp, 1, keepdim=True)
        return torch.where(ok, ids, 0), lp.float(), ok

    def _direction_images(self) -> torch.Tensor:
        """(g, D, 3) the sampling's directions under each symmetry operator (g = 1 without symmetry)."""
        return self._images(self._direction_vectors())

    def _out_of_rot_plane(self, rot_deg: torch.Tensor) -> torch.Tensor:
        """(n, D) degrees between each direction and the plane through z at each particle's rot (n,) (RELION's
        calculateDeltaRot: |asin| of the direction's y after turning it by −rot about z), the smallest over the
        direction's symmetry images."""
        a = torch.deg2rad(rot_deg)[:, None]
        out = None
        for v in self._direction_images():  # (D, 3) per operator: (n, D) at a time, not (g, n, D)
            y = -torch.sin(a) * v[None, :, 0] + torch.cos(a) * v[None, :, 1]
            d = torch.rad2deg(torch.asin(y.clamp(-1.0, 1.0))).abs()
            out = d if out is None else torch.minimum(out, d)
        assert out is not None
        return out

    def _tilt_differences(self, tilt_deg: torch.Tensor) -> torch.Tensor:
        """(n, D) |tilt − each particle's tilt (n,)| in degrees (taken as 360 − it beyond 180, as RELION), the
        smallest over the direction's symmetry images."""
        out = None
        for v in self._direction_images():
            d = (torch.rad2deg(torch.acos(v[:, 2].clamp(-1.0, 1.0)))[None, :] - tilt_deg[:, None]).abs()
            d = torch.where(d > 180.0, (d - 360.0).abs(), d)
            out = d if out is None else torch.minimum(out, d)
        assert out is not None
        return out

    def _direction_vectors(self) -> torch.Tensor:
        """(D, 3) unit vectors of the sampling's directions, on the device."""

        def make() -> torch.Tensor:
            s = self.sampling
            rot_all, tilt_all = healpix_directions(s.order)
            return torch.as_tensor(direction_vectors(rot_all[s.ipix], tilt_all[s.ipix]), device=self.device)

        return self._once("directions", make)

    def _images(self, va: torch.Tensor) -> torch.Tensor:
        """(g, n, 3) the particles' directions under each symmetry operator (g = 1 without symmetry): the angle of a
        grid direction to the nearest image is RELION's angle under symmetry."""
        if self.sampling.sym_matrices is None:
            return va[None]
        return va @ self._once(
            "sym", lambda: to_device(np.asarray(self.sampling.sym_matrices, dtype=np.float64), va.device)
        )

    def _direction_angles(self, va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        """(n, D) degrees between particle directions va (n, 3) and directions vb (D, 3), the nearest symmetry image."""
        dots = (self._images(va) @ vb.T).amax(0)
        return torch.rad2deg(torch.arccos(dots.clamp(-1.0, 1.0)))

    def _directions_near(self, va: torch.Tensor, max_angle_deg: float):
        """The sampling's directions within ``max_angle_deg`` of each particle (n,), without comparing all D of them:
        the pixels NEAR_LEVELS orders coarser whose centres lie within max_angle + their radius of an image of the
        particle hold every such direction (NEST ids: a coarse pixel's children are consecutive). At HEALPix order 8
        the whole comparison would be (n × 786,432) per batch, seconds of an iteration. Returns (cols (n, M) direction
        rows, ascending, angles (n, M) degrees, valid (n, M)) holding every direction within max_angle (a particle
        with none: its nearest must then be found among all, the caller's full comparison)."""
        s, dev = self.sampling, va.device
        k0 = s.order - NEAR_LEVELS
        children = 4**NEAR_LEVELS

        def make():
            parents = np.unique(np.asarray(s.ipix) // children)  # coarse pixels with a sampled child
            rot_c, tilt_c = healpix_directions(k0)
            row = np.full(12 * 4**s.order, -1, dtype=np.int64)  # NEST id at the sampling's order -> direction row
            row[np.asarray(s.ipix)] = np.arange(len(s.ipix))
            return (
                torch.as_tensor(parents, device=dev),
                torch.as_tensor(direction_vectors(rot_c[parents], tilt_c[parents]), device=dev),
                torch.as_tensor(row, device=dev),
            )

        parents, vc, row = self._once("near", make)
        images = self._images(va)  # (g, n, 3)
        g, n = images.shape[:2]
        reach = np.radians(max_angle_deg) + max_pixrad(k0) + 1e-9
        pick, ok = _compact(
            images.reshape(-1, 3) @ vc.T > np.cos(min(reach, np.pi))
        )  # (g·n, m) coarse pixels near each image
        fine = (parents[pick] * children)[:, :, None] + torch.arange(
            children, device=dev
        )  # (g·n, m, children) NEST ids
        cols = torch.where(ok[:, :, None], row[fine], -1).reshape(g, n, -1).permute(1, 0, 2).reshape(n, -1)
        D = len(s.ipix)
        cols = torch.where(cols >= 0, cols, D).sort(1).values  # ascending; absent directions (D) last
        valid = cols < D
        valid[:, 1:] &= cols[:, 1:] != cols[:, :-1]  # a direction near two images of a particle counts once
        cols = cols.clamp(max=D - 1)
        vb = self._direction_vectors()[cols]  # (n, M, 3)
        ang = torch.rad2deg(torch.arccos(torch.einsum("gnk,nmk->gnm", images, vb).amax(0).clamp(-1.0, 1.0)))
        return cols, ang, valid
