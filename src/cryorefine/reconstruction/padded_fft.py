"""The M-step's transforms of the padded grid, one slab at a time, from and to the cube of frequencies an iteration's
window holds.

RELION's gridding iterations and the final inverse transform run on the whole padded grid (P³, P = pad·box, float64:
a box-450 map at --pad 2 held ~46 GiB of whole-grid temporaries). Only the cube about the origin that the window
reaches has data, and only its values (or the central box of the real-space map) are wanted, so each 3D transform
is done as separable passes: the two centred axes (z, y) for a few x columns at a time, then the x axis for a few z
rows. The one whole-size buffer is P × P × m complex (m the cube's x columns), and each pass's temporaries are
bounded by SLAB_BYTES. Same arithmetic as the 3D transforms, in another order (differences at rounding level).

Cubes are centred half grids: (n, n, m), index i of the first two axes holds frequency i − n//2, x from 0.
"""

from __future__ import annotations

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


def _zy_inverse(cube: torch.Tensor, size: int, rows: int, norm: str) -> torch.Tensor:
    """Inverse transforms along the centred z and y axes of ``cube`` (n, n, m) embedded in a ``size``-point grid:
    (rows, rows, m), the real-space rows −rows//2 .. rows − rows//2 − 1 of both (all ``size`` in the standard layout
    when rows == size)."""
    m = cube.shape[2]
    out = torch.empty((rows, rows, m), dtype=torch.complex128, device=cube.device)
    for x0, x1 in _slabs(m, 48 * size * size):
        slab = origin_first(origin_first(cube[:, :, x0:x1].to(torch.complex128), 0, size), 1, size)
        slab = torch.fft.ifft2(slab, dim=(0, 1), norm=norm)
        out[:, :, x0:x1] = slab if rows == size else centred_take(centred_take(slab, 0, rows), 1, rows)
    return out


def row_slabs(size: int) -> list[tuple[int, int]]:
    """The (z0, z1) real-space row slabs blob_convolution_magnitude asks its factor for."""
    return list(_slabs(size, 40 * size * size))


def blob_convolution_magnitude(a: torch.Tensor, size: int, multiplier_rows) -> torch.Tensor:
    """|a ∗ blob| on the cube of ``a`` (n, n, m) real (float64), the convolution done as RELION's gridding does it on
    the whole ``size``-point grid: inverse transform (unscaled), product with the blob's real-space transform, forward
    transform (scaled by 1/size³). ``multiplier_rows(z0, z1)``: that product's factor for real-space rows z0..z1 − 1
    (standard layout), (z1 − z0, size, size)."""
    n, m = a.shape[0], a.shape[2]
    g = _zy_inverse(a, size, size, "forward")  # (size, size, m): real-space z, y; frequency x
    for z0, z1 in row_slabs(size):
        real = torch.fft.irfft(g[z0:z1], n=size, dim=-1, norm="forward")
        real *= multiplier_rows(z0, z1)
        g[z0:z1] = torch.fft.rfft(real, dim=-1, norm="forward")[..., :m]
    out = torch.empty((n, n, m), dtype=torch.float64, device=a.device)
    for x0, x1 in _slabs(m, 48 * size * size):
        slab = torch.fft.fft2(g[:, :, x0:x1], dim=(0, 1), norm="forward")
        out[:, :, x0:x1] = centred_take(centred_take(slab, 0, n), 1, n).abs()
    return out


def central_box_of_inverse(f: torch.Tensor, size: int, box: int) -> torch.Tensor:
    """The central (box, box, box) of the real-space inverse transform (irfftn, 1/size³) of the centred half transform
    ``f`` (n, n, m) complex embedded in a ``size``-point grid: voxel box//2 is the origin (irfft3_centered, cropped)."""
    g = _zy_inverse(f, size, box, "backward")  # (box, box, m)
    out = torch.empty((box, box, box), dtype=torch.float64, device=f.device)
    for z0, z1 in _slabs(box, 24 * box * size):
        out[z0:z1] = centred_take(torch.fft.irfft(g[z0:z1], n=size, dim=-1), -1, box)
    return out
