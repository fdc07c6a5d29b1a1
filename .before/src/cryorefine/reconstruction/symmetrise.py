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
    return sum((rotate_map(volume, R) for R in ops), torch.zeros_like(volume)) / len(ops)


SYMMETRISE_CHUNK = 1 << 20  # voxels interpolated at once: bounds the (voxels, 8 corners) temporaries (~300 MB)


def symmetrise_backprojector(bp, sym: str) -> None:
    """Sum the accumulators over the point group in Fourier space (RELION's BackProjector::symmetrise), in place.

    data'(k) = Σ_g data(R_g k), weight'(k) = Σ_g weight(R_g k), read by trilinear interpolation on the
    padded half grid (Friedel mates conjugated); SYMMETRISE_CHUNK voxels at a time.
    """
    from ..projection.extract import _trilinear_corners

    ops = symmetry_matrices(sym)
    if len(ops) == 1:
        return
    size = bp.size
    dev = bp.data.device
    k = torch.arange(size, device=dev, dtype=bp.weight.dtype) - size // 2
    nx = size // 2 + 1
    data_tab = torch.view_as_real(bp.data).reshape(-1, 2)
    w_tab = bp.weight.reshape(-1)
    new_d = bp.data.clone().reshape(-1)
    new_w = bp.weight.clone().reshape(-1)
    rotations = ops[1:].to(device=dev, dtype=bp.weight.dtype)
    for start in range(0, new_w.numel(), SYMMETRISE_CHUNK):
        flat_index = torch.arange(start, min(new_w.numel(), start + SYMMETRISE_CHUNK), device=dev)
        z, y, x = flat_index // (size * nx), (flat_index // nx) % size, flat_index % nx
        coords = torch.stack([x.to(k.dtype), k[y], k[z]], -1)  # grid order of the centred half transform
        for R in rotations:
            flat, w, flip = _trilinear_corners(coords @ R, size)
            d = (data_tab[flat] * w.unsqueeze(-1)).sum(-2)
            d = torch.view_as_complex(d.contiguous())
            new_d[flat_index] += torch.where(flip, d.conj(), d)
            new_w[flat_index] += (w_tab[flat] * w).sum(-1)
    bp.data = new_d.reshape(bp.data.shape)
    bp.weight = new_w.reshape(bp.weight.shape)
