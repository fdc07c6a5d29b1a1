"""Noise spectra σ² per noise group and shell (per real/imaginary component), RELION's sigma2_noise."""

from __future__ import annotations

import numpy as np
import torch

from ..fourier.filters import soft_mask_outside_map
from ..fourier.grids import rfft2_centered, shell_index_2d
from ..io.particles import ParticleTable, read_images


def initial_sigma2(table: ParticleTable, n_groups: int, max_particles: int = 1000, batch: int = 256, device=None,
                   mask_radius_px: float | None = None, mask_edge_px: float = 5.0) -> torch.Tensor:
    """(G, d//2+1) σ² from the images: (⟨|X|²⟩ − |⟨X⟩|²)/2 per shell, per group (RELION's start from the power spectra),
    of the images under the soft circular particle mask of ``mask_radius_px`` if given (RELION masks them only with
    --zero_mask, as its E-step does)."""
    box = table.box
    S = box // 2 + 1
    shells = shell_index_2d(box, device).flatten().clamp(max=S - 1)
    idx = np.linspace(0, len(table) - 1, min(len(table), max_particles)).round().astype(int)
    idx = np.unique(idx)
    power = torch.zeros(n_groups, S, dtype=torch.float64, device=device)
    mean = torch.zeros(n_groups, box * (box // 2 + 1), dtype=torch.complex128, device=device)
    count = torch.zeros(n_groups, dtype=torch.float64, device=device)
    for s0 in range(0, len(idx), batch):
        rows = idx[s0 : s0 + batch]
        imgs = torch.from_numpy(read_images(table, rows)).to(device)
        if mask_radius_px is not None:
            imgs = soft_mask_outside_map(imgs, mask_radius_px, mask_edge_px, ndim=2)
        f = rfft2_centered(imgs).flatten(1).to(torch.complex128)
        g = torch.as_tensor(table.optics_group[rows], device=device)
        p = torch.zeros(len(rows), S, dtype=torch.float64, device=device).index_add_(1, shells, f.abs() ** 2)
        power.index_add_(0, g, p)
        mean.index_add_(0, g, f)
        count.index_add_(0, g, torch.ones(len(rows), dtype=torch.float64, device=device))
    npix = torch.zeros(S, dtype=torch.float64, device=device).index_add_(0, shells, torch.ones_like(shells, dtype=torch.float64))
    c = count.clamp(min=1)[:, None]
    mean = mean / c
    mean_power = torch.zeros(n_groups, S, dtype=torch.float64, device=device).index_add_(1, shells, mean.abs() ** 2)
    sigma2 = (power / c - mean_power) / (2.0 * npix.clamp(min=1))
    # groups without particles in the sample take the average of the others
    empty = count == 0
    if empty.any():
        sigma2[empty] = sigma2[~empty].mean(0)
    return sigma2.clamp(min=1e-12)


def update_sigma2(old: torch.Tensor, wsum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """σ² = Σ Γ|X − sCP|² / (2 · count) where there were data (every shell up to Nyquist: beyond the E-step window the
    images' own power, estep.expectation.add_power_beyond_window); elsewhere the previous value."""
    new = wsum / (2.0 * count.clamp(min=1))
    return torch.where(count > 0, new, old).clamp(min=1e-12)
