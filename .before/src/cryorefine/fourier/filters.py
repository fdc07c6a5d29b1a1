"""Low-pass filters and soft masks (RELION-style raised-cosine edges)."""

from __future__ import annotations

import math

import torch

from .grids import irfft3_centered, radial_map, rfft3_centered, rfft_freqs_3d


def low_pass_filter(
    volume: torch.Tensor, resolution_angst: float, angpix: float, edge_width_shells: float = 2.0
) -> torch.Tensor:
    """Low-pass a (d, d, d) map to ``resolution_angst`` with a raised-cosine edge ``edge_width_shells`` wide."""
    d = volume.shape[-1]
    f = rfft3_centered(volume)
    kz, ky, kx = rfft_freqs_3d(d, volume.device, torch.float64)
    r = torch.sqrt(kx**2 + ky**2 + kz**2)
    cutoff = d * angpix / resolution_angst
    lo, hi = cutoff - edge_width_shells / 2, cutoff + edge_width_shells / 2
    filt = torch.where(
        r <= lo, 1.0, torch.where(r >= hi, 0.0, 0.5 + 0.5 * torch.cos(math.pi * (r - lo) / max(hi - lo, 1e-9)))
    )
    return irfft3_centered(f * filt.to(f.real.dtype), d).to(volume.dtype)


def _raised_cosine(radius_px: float, edge_px: float):
    """The soft sphere's radial profile: 1 up to ``radius_px``, a raised cosine down to 0 over ``edge_px`` (float64)."""

    def profile(r: torch.Tensor) -> torch.Tensor:
        edge = 0.5 + 0.5 * torch.cos(math.pi * (r - radius_px) / max(edge_px, 1e-9))
        return torch.where(r <= radius_px, 1.0, torch.where(r >= radius_px + edge_px, 0.0, edge))

    return profile


def soft_sphere(shape, radius_px: float, edge_px: float = 5.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """1 inside ``radius_px`` of the centre pixel, cosine fall-off to 0 over ``edge_px`` (2D or 3D shape)."""
    return radial_map(shape, _raised_cosine(radius_px, edge_px), device, dtype)


def soft_mask_outside_map(
    x: torch.Tensor,
    radius_px: float | None = None,
    edge_px: float = 3.0,
    ndim: int = 3,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """RELION's softMaskOutsideMap over the last ``ndim`` axes of ``x`` (leading axes: a batch): pixels beyond
    ``radius_px`` (default d/2) of the centre pixel are blended, by a raised cosine over ``edge_px``, into ``fill``
    (RELION's noise map) or, without it, into the mean of the region outside (weighted by the same cosine); beyond
    radius + edge they are that. Every reconstruction ends with it (3 px, radius d/2: the noise in the cube's corners,
    aliasing of the padded transform's window, stays out of FSCs, τ² and the next references); the E-step masks the
    particle images with it (--particle_diameter, 5 px)."""
    shape = x.shape[-ndim:]
    radius = shape[-1] / 2.0 if radius_px is None else radius_px
    inside = _raised_cosine(radius, edge_px)
    # both weights looked up per r² in x's dtype (radial_map), no arithmetic on the whole grid for them
    noise_w = radial_map(shape, lambda r: 1.0 - inside(r).to(x.dtype), x.device, x.dtype)
    keep_w = radial_map(shape, lambda r: 1.0 - (1.0 - inside(r).to(x.dtype)), x.device, x.dtype)
    if fill is None:
        axes = tuple(range(-ndim, 0))
        fill = (noise_w * x).sum(axes, keepdim=True) / noise_w.sum().clamp(min=1e-30)
    out, outside = keep_w * x, noise_w * fill
    return out.add_(outside) if outside.shape == out.shape and outside.dtype == out.dtype else out + outside
