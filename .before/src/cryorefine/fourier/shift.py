"""Phase shifts: translating images in Fourier space."""

from __future__ import annotations

import math

import torch


def phase_shift_factors(ky: torch.Tensor, kx: torch.Tensor, shifts_px: torch.Tensor, box: int) -> torch.Tensor:
    """exp(-2πi (kx·sx + ky·sy)/d): multiplying a centred transform by this moves the image by +s.

    ky, kx: (j,) integer frequencies; shifts_px: (..., 2) as (x, y) in pixels -> (..., j) complex.
    """
    phase = (-2.0 * math.pi / box) * (shifts_px[..., 0:1] * kx + shifts_px[..., 1:2] * ky)
    return torch.polar(torch.ones_like(phase), phase)


def shift_images_rfft(f_rfft: torch.Tensor, shifts_px: torch.Tensor, box: int) -> torch.Tensor:
    """Shift (..., d, d//2+1) transforms by shifts_px (..., 2) (x, y) pixels (positive moves right/up in index)."""
    from .grids import rfft_freqs_2d

    ky, kx = rfft_freqs_2d(box, f_rfft.device, shifts_px.dtype)
    phase = (-2.0 * math.pi / box) * (shifts_px[..., 0, None, None] * kx + shifts_px[..., 1, None, None] * ky)
    return f_rfft * torch.polar(torch.ones_like(phase), phase).to(f_rfft.dtype)
