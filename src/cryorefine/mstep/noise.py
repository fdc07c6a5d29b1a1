"""Noise spectra σ² per noise group and shell (per real/imaginary component), RELION's sigma2_noise."""

from __future__ import annotations

import numpy as np
import torch

from ..fourier.filters import soft_mask_outside_map
from ..fourier.grids import rfft2_centered, shell_index_2d
from ..io.table import ParticleTable, read_images


def initial_sigma2(
    table: ParticleTable,
    n_groups: int,
    subset: np.ndarray | None = None,
    batch: int = 256,
    device=None,
    mask_radius_px: float | None = None,
    mask_edge_px: float = 5.0,
) -> torch.Tensor:
    """(H, G, d//2+1) σ² from the images, RELION's start (calculateSumOfPowerSpectraAndAverageImage): per subset h
    (``subset`` (n,) labels 0..H−1, e.g. the half sets; None: one subset of all particles) and group, the mean power
    per shell of that subset's images, minus the power of the average image of all particles, halved (per
    real/imaginary component). Every image is read, as RELION does; the pixels past Nyquist (the corners) count in no
    shell. The images are under the soft circular particle mask of ``mask_radius_px`` if given (RELION masks them
    only with --zero_mask, as its E-step does)."""
    box = table.box
    S = box // 2 + 1
    shells = shell_index_2d(box, device).flatten()
    inside = shells < S
    shells_in = shells[inside]
    labels = np.zeros(len(table), dtype=np.int64) if subset is None else np.asarray(subset, dtype=np.int64)
    H = int(labels.max()) + 1 if len(labels) else 1
    power = torch.zeros(H * n_groups, S, dtype=torch.float64, device=device)
    count = torch.zeros(H * n_groups, dtype=torch.float64, device=device)
    mean = torch.zeros(n_groups, box * (box // 2 + 1), dtype=torch.complex128, device=device)
    for s0 in range(0, len(table), batch):
        rows = np.arange(s0, min(s0 + batch, len(table)))
        imgs = torch.from_numpy(read_images(table, rows)).to(device)
        if mask_radius_px is not None:
            imgs = soft_mask_outside_map(imgs, mask_radius_px, mask_edge_px, ndim=2)
        f = rfft2_centered(imgs).flatten(1).to(torch.complex128)
        g = torch.as_tensor(table.optics_group[rows], device=device)
        hg = torch.as_tensor(labels[rows], device=device) * n_groups + g
        p = torch.zeros(len(rows), S, dtype=torch.float64, device=device).index_add_(
            1, shells_in, f[:, inside].abs() ** 2
        )
        power.index_add_(0, hg, p)
        count.index_add_(0, hg, torch.ones(len(rows), dtype=torch.float64, device=device))
        mean.index_add_(0, g, f)
    npix = torch.zeros(S, dtype=torch.float64, device=device).index_add_(
        0, shells_in, torch.ones_like(shells_in, dtype=torch.float64)
    )
    per_group = torch.zeros(n_groups, dtype=torch.float64, device=device).index_add_(
        0, torch.arange(H * n_groups, device=device) % n_groups, count
    )
    mean = mean / per_group.clamp(min=1)[:, None]
    mean_power = torch.zeros(n_groups, S, dtype=torch.float64, device=device).index_add_(
        1, shells_in, mean[:, inside].abs() ** 2
    )
    sigma2 = ((power / count.clamp(min=1)[:, None]).reshape(H, n_groups, S) - mean_power) / (2.0 * npix.clamp(min=1))
    # a group without particles in a subset takes the average of that subset's others
    empty = (count == 0).reshape(H, n_groups)
    for h in range(H):
        if empty[h].any() and not empty[h].all():
            sigma2[h, empty[h]] = sigma2[h, ~empty[h]].mean(0)
    return sigma2.clamp(min=1e-12)


def update_sigma2(old: torch.Tensor, wsum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """σ² = Σ Γ|X − sCP|² / (2 · count) where there were data (every shell up to Nyquist: beyond the E-step window the
    images' own power, estep.store.add_power_beyond_window); elsewhere the previous value."""
    new = wsum / (2.0 * count.clamp(min=1))
    return torch.where(count > 0, new, old).clamp(min=1e-12)
