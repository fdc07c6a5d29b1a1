"""The M-step's transforms of the padded grid, one slab at a time, from and to the cube of frequencies an iteration's
window holds.

RELION's gridding iterations run on a grid of edge G (reconstruct.gridding_grid_size: about pad·(current size), P + 3
for the whole map) and its final inverse transform on the padded grid (P³, P = pad·box; float64: a box-450 map at
--pad 2 held ~46 GiB of whole-grid temporaries). Only the cube about the origin that the window reaches has data, and
only its values (or the central box of the real-space map) are wanted, so each 3D transform is done as separable
passes: the two centred axes (z, y) for a few x columns at a time, then the x axis for a few z rows. The one
whole-size buffer is G × G × m or d × d × m complex (m the cube's x columns), and each pass's temporaries are bounded
by SLAB_BYTES. Same arithmetic as the 3D transforms, in another order (differences at rounding level).

Cubes are centred half grids: (n, n, m), index i of the first two axes holds frequency i − n//2, x from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fourier.grids import centred_take, origin_first

SLAB_BYTES = 1 << 28  # temporaries of one pass's slab


def slab_bytes(size: int, columns: int) -> int:
    """Bytes of one pass's slab temporaries on a ``size``-point grid of ``columns`` x columns: SLAB_BYTES, at least one
    column's, at most all of them."""
    column = 48 * size * size
    return max(column, min(SLAB_BYTES, column * columns))


def _slabs(total: int, bytes_each: int):
    """(start, stop) of consecutive slabs of ``total`` items whose temporaries take ``bytes_each`` bytes per item."""
    step = max(1, SLAB_BYTES // max(1, bytes_each))
    return ((i, min(total, i + step)) for i in range(0, total, step))


@dataclass(frozen=True)
class SlabDevices:
    """Where the passes run and where the P × P × m buffer lives, when not on the cube's own device (the memory plan's
    M-step on the host: the cube's float64 work there, the transforms on the GPU, the buffer on either)."""

    transforms: torch.device | None = None  # None: the cube's device
    buffer: torch.device | None = None

    def buffer_like(self, shape: tuple[int, ...], cube: torch.Tensor) -> torch.Tensor:
        device = self.buffer or cube.device
        pin = device.type == "cpu" and (self.transforms or cube.device).type == "cuda"  # pinned: faster copies
        return torch.empty(shape, dtype=torch.complex128, device=device, pin_memory=pin)

    def to_transforms(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.transforms is None else x.to(self.transforms)


SAME_DEVICE = SlabDevices()


def _zy_inverse(
    columns, n: int, m: int, size: int, rows: int, norm: str, devices: SlabDevices, like: torch.Tensor
) -> torch.Tensor:
    """Inverse transforms along the centred z and y axes of a cube (n, n, m) embedded in a ``size``-point grid, the
    cube's x columns x0..x1 − 1 given by ``columns(x0, x1)`` on the transforms' device: (rows, rows, m), the real-space
    rows −rows//2 .. rows − rows//2 − 1 of both (all ``size`` in the standard layout when rows == size), in a buffer
    on ``devices.buffer`` (default ``like``'s device)."""
    out = devices.buffer_like((rows, rows, m), like)
    for x0, x1 in _slabs(m, 48 * size * size):
        slab = columns(x0, x1).to(torch.complex128)
        slab = torch.fft.ifft2(origin_first(origin_first(slab, 0, size), 1, size), dim=(0, 1), norm=norm)
        out[:, :, x0:x1] = slab if rows == size else centred_take(centred_take(slab, 0, rows), 1, rows)
    return out


def row_slabs(size: int) -> list[tuple[int, int]]:
    """The (z0, z1) real-space row slabs blob_convolution asks its factor for."""
    return list(_slabs(size, 40 * size * size))


def blob_convolution(
    columns, n: int, m: int, size: int, multiplier_rows, consume, devices: SlabDevices, like: torch.Tensor
) -> None:
    """|a ∗ blob| on a cube a (n, n, m) real (float64), the convolution done as RELION's gridding does it on the whole
    ``size``-point grid: inverse transform (unscaled), product with the blob's real-space transform, forward transform
    (scaled by 1/size³). By slabs on the transforms' device: a's x columns x0..x1 − 1 come from ``columns(x0, x1)``
    and the result's go to ``consume(x0, x1, values)`` once every column has been read (so it may update what
    ``columns`` reads); ``multiplier_rows(z0, z1)`` is the product's factor for real-space rows z0..z1 − 1 (standard
    layout), (z1 − z0, size, size). ``like``: a tensor on the cube's device."""
    g = _zy_inverse(columns, n, m, size, size, "forward", devices, like)  # (size, size, m): real z, y; frequency x
    for z0, z1 in row_slabs(size):
        real = torch.fft.irfft(devices.to_transforms(g[z0:z1]), n=size, dim=-1, norm="forward")
        real *= multiplier_rows(z0, z1)
        g[z0:z1] = torch.fft.rfft(real, dim=-1, norm="forward")[..., :m]
    for x0, x1 in _slabs(m, 48 * size * size):
        slab = torch.fft.fft2(devices.to_transforms(g[:, :, x0:x1]), dim=(0, 1), norm="forward")
        consume(x0, x1, centred_take(centred_take(slab, 0, n), 1, n).abs())


def central_box_of_inverse(f: torch.Tensor, size: int, box: int, devices: SlabDevices = SAME_DEVICE) -> torch.Tensor:
    """The central (box, box, box) of the real-space inverse transform (irfftn, 1/size³) of the centred half transform
    ``f`` (n, n, m) complex embedded in a ``size``-point grid: voxel box//2 is the origin (irfft3_centered, cropped)."""
    n, m = f.shape[0], f.shape[2]
    g = _zy_inverse(lambda x0, x1: devices.to_transforms(f[:, :, x0:x1]), n, m, size, box, "backward", devices, f)
    out = torch.empty((box, box, box), dtype=torch.float64, device=f.device)
    for z0, z1 in _slabs(box, 24 * box * size):
        out[z0:z1] = centred_take(torch.fft.irfft(devices.to_transforms(g[z0:z1]), n=size, dim=-1), -1, box)
    return out
