"""Imposing point-group symmetry on maps (real space) and on back-projection accumulators (Fourier space)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry.symmetry import symmetry_matrices


def rotate_map(volume: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """v'(x) = v(Rᵀ x) about the centre voxel d//2, trilinear (x as (x, y, z) voxel offsets)."""
    d = volume.shape[-1]
    c = torch.arange(d, dtype=volume.dtype, device=volume.device) - d // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1) @ R.to(volume.dtype)  # row vector times R = (Rᵀ x)ᵀ
    # grid_sample wants coordinates in [-1, 1] with align_corners=True: index i -> -1 + 2 i/(d-1)
    grid = (pts + d // 2) * (2.0 / (d - 1)) - 1.0
    out = F.grid_sample(volume[None, None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0]


def symmetrise_map(volume: torch.Tensor, sym: str) -> torch.Tensor:
    """Average of the map over the operators of point group ``sym`` (RELION's axes)."""
    ops = symmetry_matrices(sym).to(device=volume.device, dtype=volume.dtype)
    if len(ops) == 1:
        return volume
    return sum(rotate_map(volume, R) for R in ops) / len(ops)
