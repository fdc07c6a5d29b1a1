"""Back-projection: scatter-add weighted 2D slices into the padded 3D half transform (RELION's BackProjector)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tiling import run_tiles
from . import insert_kernel
from .extract import MAX_POINTS, _trilinear_corners, slice_coordinates


@dataclass
class BackProjector:
    """Accumulators on the padded grid: data (S, S, S//2+1) complex and weight (same shape) real, centred as
    PaddedTransform: the whole grid (S = P = pad·box) or the cube about the origin an iteration's window reaches
    (extract.window_grid_size; RELION sizes its back-projectors by the current image size)."""

    data: torch.Tensor
    weight: torch.Tensor
    box: int
    pad: int

    @classmethod
    def zeros(
        cls, box: int, pad: int = 2, device=None, dtype=torch.float32, size: int | None = None
    ) -> "BackProjector":
        size = box * pad if size is None else size
        shape = (size, size, size // 2 + 1)
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return cls(
            torch.zeros(shape, dtype=cdtype, device=device), torch.zeros(shape, dtype=dtype, device=device), box, pad
        )

    @property
    def size(self) -> int:
        """S, the stored grid's edge (padded voxels)."""
        return self.data.shape[0]

    @property
    def padded_size(self) -> int:
        """P = pad·box: the padded map's edge, whose transform the stored grid is (part of)."""
        return self.box * self.pad

    def insert(
        self,
        rotations: torch.Tensor,
        ky: torch.Tensor,
        kx: torch.Tensor,
        values: torch.Tensor,
        weights: torch.Tensor,
        spare_bytes: int = 0,
    ) -> None:
        """Add slices ``values`` (r, j) complex with ``weights`` (r, j) at Fourier pixels (kx, ky) (j,) under
        rotations (r, 3, 3): on the CPU by a compiled loop (cpu_kernels.py), float32 accumulators on a CUDA device by
        the fused kernel of insert_kernel.py (its fastest form needs a transient grid: ``spare_bytes`` says how much
        memory may be allocated now), others by insert_by_index_add."""
        if insert_kernel.available(self.weight):
            insert_kernel.insert_fused(
                self.data, self.weight, self.pad, rotations, ky, kx, values, weights, spare_bytes=spare_bytes
            )
            return
        if self.data.device.type == "cpu":
            from . import cpu_kernels  # numba: imported only where it runs

            cpu_kernels.insert(self.data, self.weight, self.pad, rotations, ky, kx, values, weights)
            return
        insert_by_index_add(self, rotations, ky, kx, values, weights)


def insert_by_index_add(
    bp: BackProjector,
    rotations: torch.Tensor,
    ky: torch.Tensor,
    kx: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """BackProjector.insert by PyTorch operations (float64 accumulators on a GPU): (r, j, 8 corners) contributions
    scatter-added in chunks of rotations."""

    def contributions(start: int, stop: int):
        coords = slice_coordinates(rotations[start:stop].to(bp.weight.dtype), ky, kx, bp.pad)
        flat, w, flip = _trilinear_corners(coords, bp.size)  # (r, j, 8)
        v = torch.where(flip, values[start:stop].conj(), values[start:stop]).to(bp.data.dtype)
        data = torch.view_as_real(v.unsqueeze(-1) * w.to(bp.weight.dtype)).reshape(-1, 2)  # (r·j·8, 2)
        weight = (weights[start:stop].to(bp.weight.dtype).unsqueeze(-1) * w).reshape(-1)
        return flat.reshape(-1), data, weight

    def add(start: int, stop: int, c) -> None:
        flat, data, weight = c
        torch.view_as_real(bp.data).reshape(-1, 2).index_add_(0, flat, data)
        bp.weight.view(-1).index_add_(0, flat, weight)

    run_tiles(rotations.shape[0], max(1, MAX_POINTS // max(1, ky.numel())), contributions, add)


def enforce_hermitian_x0(data: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum each x = 0 voxel with its Friedel mate (-y, -z), as RELION's enforceHermitianSymmetry does.

    Points inserted just right of x = 0 leave their mates' contribution missing on that plane.
    """
    size = data.shape[0]
    data, weight = data.clone(), weight.clone()
    plane_d, plane_w = data[..., 0], weight[..., 0]
    # index i holds frequency i - size//2; its mate -k sits at size - i (mod size) for even size
    mate = (-(torch.arange(size, device=data.device) - size // 2)) % size
    mate = (mate + size // 2) % size
    mate_d = plane_d[mate][:, mate].conj()
    mate_w = plane_w[mate][:, mate]
    data[..., 0] = plane_d + mate_d
    weight[..., 0] = plane_w + mate_w
    return data, weight
