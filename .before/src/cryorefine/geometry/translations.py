"""RELION's 2D translation grid (HealpixSampling::setTranslations / getTranslationsInPixel).

RELION 3.1 keeps offset range/step in Angstrom; here everything is in pixels
(range_px = range_A / pixel_size). The coarse grid: ix outer, iy inner over
-ceil(range/step)..ceil(range/step), keep (ix*step, iy*step) if x^2 + y^2 < range^2 + 0.001.
Fine pass (oversampling q): each offset -> 4**q offsets at -step/2 + (0.5 + i) step / 2**q in
x (outer) and y (inner); q = 1: +-step/4. With a random perturbation r every (coarse and
fine) offset is shifted by r * step in both x and y.
"""

from __future__ import annotations

import math

import torch


def translation_grid_px(
    offset_range_px: float, offset_step_px: float, dtype=torch.float64, device=None
) -> torch.Tensor:
    """(T, 2) (x, y) offsets in pixels, in RELION's order (x-major)."""
    if offset_step_px <= 0:
        raise ValueError("offset_step_px must be positive")
    r, s = float(offset_range_px), float(offset_step_px)
    m = math.ceil(r / s - 1e-9)
    i = torch.arange(-m, m + 1, dtype=torch.float64)
    x, y = torch.meshgrid(i * s, i * s, indexing="ij")  # x outer, y inner
    xy = torch.stack([x.reshape(-1), y.reshape(-1)], -1)
    keep = (xy**2).sum(-1) < r * r + 0.001
    return xy[keep].to(dtype=dtype, device=device)


def child_translations(step_px: float, oversampling: int = 1, dtype=torch.float64, device=None) -> torch.Tensor:
    """(4**q, 2) offsets of the fine grid relative to a coarse offset (x outer, y inner);
    q = 1: (-s/4,-s/4), (-s/4,+s/4), (+s/4,-s/4), (+s/4,+s/4)."""
    n = 1 << oversampling
    d = -0.5 * step_px + (0.5 + torch.arange(n, dtype=torch.float64)) * step_px / n
    x, y = torch.meshgrid(d, d, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1).to(dtype=dtype, device=device)


def perturb_translations_px(offsets_px: torch.Tensor, random_perturbation: float, step_px: float) -> torch.Tensor:
    """RELION getTranslationsInPixel: add random_perturbation * coarse step to x and y."""
    return offsets_px + float(random_perturbation) * float(step_px)
