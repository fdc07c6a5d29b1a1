"""The pose grid of one iteration: coarse rotations and translations, their fine children, local-search candidates.

Rotation ids: coarse id c = direction_row · n_psi + psi_row of the (perturbed) HEALPix grid; its fine
children are 8·c + k (k = child_direction·2 + child_psi, RELION's order). Translations: coarse id t of
the grid around each particle's previous offset; fine children 4·t + k (±step/4 in x and y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..geometry.euler import euler_to_matrix
from ..geometry.healpix import HealpixSampling, directions_within, oversampled_eulers, sampling_eulers
from ..geometry.translations import child_translations, perturb_translations_px, translation_grid_px

N_ROT_CHILDREN = 8
N_TRANS_CHILDREN = 4


@dataclass
class PoseGrid:
    sampling: HealpixSampling
    coarse_eulers_deg: np.ndarray  # (R, 3)
    coarse_rotations: torch.Tensor  # (R, 3, 3)
    translations_px: torch.Tensor  # (T, 2) coarse offsets relative to the previous offset, perturbed
    translation_children_px: torch.Tensor  # (4, 2)
    offset_step_px: float

    @classmethod
    def build(cls, sampling: HealpixSampling, offset_range_px: float, offset_step_px: float, device=None, dtype=torch.float32) -> "PoseGrid":
        e = sampling_eulers(sampling)
        rot = euler_to_matrix(*(torch.as_tensor(e[:, i]) for i in range(3))).to(device=device, dtype=dtype)
        t = translation_grid_px(offset_range_px, offset_step_px)
        t = perturb_translations_px(t, sampling.random_perturbation, offset_step_px)
        return cls(sampling, e, rot, t.to(device=device, dtype=dtype), child_translations(offset_step_px).to(device=device, dtype=dtype), offset_step_px)

    @property
    def n_rotations(self) -> int:
        return self.coarse_rotations.shape[0]

    @property
    def n_translations(self) -> int:
        return self.translations_px.shape[0]

    @property
    def device(self):
        return self.coarse_rotations.device

    def fine_eulers_deg(self, coarse_ids: np.ndarray) -> np.ndarray:
        """(m, 8, 3) Euler angles (degrees) of the fine children of coarse rotation ids (m,)."""
        s = self.sampling
        d, p = coarse_ids // s.n_psi, coarse_ids % s.n_psi
        return oversampled_eulers(s.order, s.ipix[d], s.psi_deg[p], random_perturbation=s.random_perturbation)

    def fine_rotations(self, coarse_ids: torch.Tensor) -> torch.Tensor:
        """(m, 8, 3, 3) rotation matrices of the fine children of coarse ids (m,)."""
        e = torch.as_tensor(self.fine_eulers_deg(coarse_ids.cpu().numpy()))
        return euler_to_matrix(e[..., 0], e[..., 1], e[..., 2]).to(device=self.device, dtype=self.coarse_rotations.dtype)

    def fine_translations(self) -> torch.Tensor:
        """(T, 4, 2) fine offsets (relative to the previous offset) of every coarse translation."""
        return self.translations_px[:, None, :] + self.translation_children_px[None]

    def local_candidates(self, rot_deg: np.ndarray, tilt_deg: np.ndarray, psi_deg: np.ndarray, sigma_ang_deg: float, sigma_cutoff: float = 3.0):
        """Coarse rotation ids near each particle's previous pose with RELION's Gaussian prior.

        Returns (ids (n, L) int64, log_prior (n, L), valid (n, L) bool), padded to the largest L.
        """
        s = self.sampling
        max_angle = sigma_cutoff * sigma_ang_deg
        dir_mask, dir_ang = directions_within(s.order, rot_deg, tilt_deg, max_angle, s.sym_matrices, ipix=s.ipix)  # (n, D)
        dpsi = (s.psi_deg[None, :] - np.asarray(psi_deg)[:, None] + 180.0) % 360.0 - 180.0  # (n, P)
        psi_mask = np.abs(dpsi) < max_angle
        none = ~psi_mask.any(1)
        psi_mask[none, np.abs(dpsi[none]).argmin(1)] = True
        n = len(rot_deg)
        ids, priors = [], []
        for i in range(n):  # per-particle sets differ in size; n is a batch (tens to hundreds)
            dd = np.flatnonzero(dir_mask[i])
            pp = np.flatnonzero(psi_mask[i])
            c = (dd[:, None] * s.n_psi + pp[None, :]).ravel()
            lp = (-(dir_ang[i, dd][:, None] ** 2) / (2 * sigma_ang_deg**2) - (dpsi[i, pp][None, :] ** 2) / (2 * sigma_ang_deg**2)).ravel()
            ids.append(c)
            priors.append(lp)
        L = max(len(c) for c in ids)
        out_ids = np.zeros((n, L), dtype=np.int64)
        out_lp = np.full((n, L), -np.inf)
        for i, (c, lp) in enumerate(zip(ids, priors)):
            out_ids[i, : len(c)] = c
            out_lp[i, : len(c)] = lp - np.log(np.exp(lp - lp.max()).sum()) - lp.max()
        dev = self.device
        lp_t = torch.as_tensor(out_lp, device=dev, dtype=torch.float32)
        return torch.as_tensor(out_ids, device=dev), lp_t, torch.isfinite(lp_t)
