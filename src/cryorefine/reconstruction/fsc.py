"""Fourier shell correlation over RELION's integer shells, and resolution at a threshold."""

from __future__ import annotations

import torch

from ..fourier.grids import rfft3_centered, shell_index_3d


def fsc_curve(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
    """FSC (d//2 + 1,) between two (d, d, d) maps over shells round(|k|); shell 0 is DC."""
    d = map1.shape[-1]
    f1 = rfft3_centered(map1.to(torch.float64))
    f2 = rfft3_centered(map2.to(torch.float64))
    shells = shell_index_3d(d, map1.device).flatten()
    n = d // 2 + 1
    keep = shells < n
    s = shells[keep]

    def shell_sum(x):
        return torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, s, x.flatten()[keep])

    num = shell_sum((f1 * f2.conj()).real)
    den = torch.sqrt(shell_sum(f1.abs() ** 2) * shell_sum(f2.abs() ** 2))
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def resolution_shell(fsc: torch.Tensor, threshold: float, consecutive: int = 1) -> int:
    """Last shell before the FSC first drops below ``threshold`` for ``consecutive`` shells in a row (shells from 1).

    0 if it is already below at shell 1. ``consecutive`` = 2 ignores single-shell dips of noisy curves.
    """
    below = (fsc[1:] < threshold).to(torch.int64)
    if consecutive > 1:
        runs = below.unfold(0, consecutive, 1).prod(1) if below.numel() >= consecutive else below[:0]
        runs = torch.cat([runs, below[len(runs):]])
        below = runs
    idx = below.nonzero()
    return int(fsc.numel() - 1 if idx.numel() == 0 else idx[0, 0])


def shell_to_angstrom(shell: float, box: int, angpix: float) -> float:
    return float("inf") if shell <= 0 else box * angpix / shell


def resolution_angstrom(fsc: torch.Tensor, threshold: float, box: int, angpix: float) -> float:
    return shell_to_angstrom(resolution_shell(fsc, threshold), box, angpix)


def fsc_to_ssnr(fsc: torch.Tensor, fudge: float = 1.0, whole: bool = False) -> torch.Tensor:
    """SSNR T·FSC/(1−FSC) of a half map from the half-set FSC (clipped to >= 0.001, then <= 0.999, as RELION).

    ``whole``: of the map from both halves, via RELION's FSC' = √(2·FSC/(1+FSC)) (twice the particles).
    """
    f = fsc.clamp(min=0.001)
    if whole:
        f = torch.sqrt(2.0 * f / (f + 1.0))
    f = f.clamp(max=0.999)
    return fudge * f / (1.0 - f)
