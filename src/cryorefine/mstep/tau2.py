"""The prior's power τ² per shell: from the half-set FSC (auto-refine) or from the map's power (classification)."""

from __future__ import annotations

import torch

from ..fourier.grids import rfft3_centered, shell_index_3d
from ..projection.insert import BackProjector
from ..reconstruction.fsc import fsc_to_ssnr
from ..reconstruction.reconstruct import reconstruction_noise_power


def tau2_from_fsc(fsc: torch.Tensor, bp: BackProjector, tau2_fudge: float = 1.0, whole: bool = False, max_shell: int | None = None) -> torch.Tensor:
    """τ² = T·SSNR·σ² (RELION's update_tau2_with_fsc): SSNR from the half-set FSC (``whole`` for the map of both
    halves), σ² the reconstruction's noise power 1/⟨pad³·weight⟩ within ``max_shell``."""
    sigma2 = reconstruction_noise_power(bp, fsc.numel(), max_shell)
    return fsc_to_ssnr(fsc.to(sigma2), tau2_fudge, whole) * sigma2


def tau2_from_map_power(volume: torch.Tensor) -> torch.Tensor:
    """τ² = ⟨|F|²⟩/2 per shell of a (d, d, d) map (per real/imaginary component, unpadded units)."""
    d = volume.shape[-1]
    f = rfft3_centered(volume.to(torch.float64))
    shells = shell_index_3d(d, volume.device).flatten()
    n = d // 2 + 1
    keep = shells < n
    p = torch.zeros(n, dtype=torch.float64, device=volume.device).index_add_(0, shells[keep], (f.abs() ** 2).flatten()[keep])
    c = torch.zeros(n, dtype=torch.float64, device=volume.device).index_add_(0, shells[keep], torch.ones_like(p[shells[keep]]))
    return p / c.clamp(min=1) / 2.0
