"""Central slices from a padded 3D Fourier transform (RELION's Projector), batched over rotations.

The volume (d, d, d) is gridding pre-corrected (divided by sinc² of the trilinear kernel), zero-padded
to P = pad·d, and transformed; the half transform is stored with z and y centred, x = 0..P/2
(``f_padded[z + P//2, y + P//2, x]``). A 2D Fourier pixel (kx, ky) of a particle with rotation A lies
at pad · (A[0]·kx + A[1]·ky) in the 3D transform (RELION's A^T (x, y, 0)); points with x < 0 are read
from their Friedel mate (conjugated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..fourier.grids import centred_take, origin_first, radial_map
from ..optics import IDENTITY_MAG, magnified
from . import extract_kernel


@dataclass(frozen=True)
class PaddedTransform:
    """A padded 3D half transform, centred in z and y: (S, S, S//2 + 1) complex, the whole grid (S = P) or the cube of
    frequencies −S/2 .. S/2 − 1 (z, y) and 0 .. S/2 (x) about the origin that an iteration's window reads (RELION sizes
    its projectors by the current image size): index arithmetic is the same on both, relative to index S//2."""

    f_padded: torch.Tensor
    box: int
    pad: int

    @property
    def size(self) -> int:
        """S, the stored grid's edge (padded voxels)."""
        return self.f_padded.shape[0]


def window_grid_size(radius_px: float | None, box: int, pad: int) -> int:
    """Edge S of the stored padded grid that holds every trilinear corner of points up to ``radius_px`` (the map's
    pixels) from the origin: 2·(⌊pad·radius⌋ + 2), or P = pad·box when that is not smaller (or ``radius_px`` is
    None). A point at padded coordinate c < S/2 − 1 has its lower corner at most S/2 − 2, inside the grid."""
    full = box * pad
    if radius_px is None:
        return full
    s = 2 * (math.floor(pad * radius_px) + 2)
    return s if s < full else full


def sinc2_gridding_kernel(box: int, pad: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """(d, d, d) real-space sinc²(π r / P) of trilinear interpolation on the padded grid (r from d//2)."""
    # torch.sinc is sin(πx)/(πx)
    return radial_map((box,) * 3, lambda r: torch.sinc(r / (box * pad)) ** 2, device, dtype, radius_dtype=dtype)


def prepare_padded_transform(volume: torch.Tensor, pad: int = 2, size: int | None = None) -> PaddedTransform:
    """(d, d, d) real map (z, y, x) -> padded, gridding pre-corrected, centred half transform; ``size``: the edge S of
    the stored grid (window_grid_size; default the whole P).

    One axis at a time (x, then y and z for a few x columns at a time), each zero-padded to P and cropped to the
    stored frequencies: the P³ padded volume and its whole transform are never held (a box-450 map at --pad 2 took
    9 GB of them; now the result and the map's x transform)."""
    d = volume.shape[-1]
    full = d * pad
    size = full if size is None else size
    f = volume / sinc2_gridding_kernel(d, pad, volume.device, volume.dtype)
    f = torch.fft.rfft(origin_first(f, -1, full), dim=-1)[..., : size // 2 + 1]
    out = torch.empty((size, size, f.shape[-1]), dtype=f.dtype, device=f.device)
    step = max(1, MAX_POINTS // (full * full))
    for x0 in range(0, f.shape[-1], step):
        slab = f[..., x0 : x0 + step]
        for dim in (-2, -3):  # frequencies −S/2 .. S/2 − 1
            slab = centred_take(torch.fft.fft(origin_first(slab, dim, full), dim=dim), dim, size)
        out[..., x0 : x0 + step] = slab
    return PaddedTransform(out, d, pad)


def slice_coordinates(rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, pad: int) -> torch.Tensor:
    """3D padded-grid coordinates (..., r, j, 3) as (x, y, z) of 2D pixels (kx, ky) (j,) under rotations
    (..., r, 3, 3)."""
    k2 = torch.stack([kx, ky], dim=-1).to(rotations.dtype)  # (j, 2)
    return pad * torch.einsum("jc,...rcd->...rjd", k2, rotations[..., :2, :])


def _trilinear_corners(coords: torch.Tensor, size: int):
    """Friedel-flip coordinates to x >= 0, then the 8 corner flat indices and weights.

    coords (..., 3) as (x, y, z) -> (flat (..., 8), weights (..., 8), conj_mask (...)). The lower corner is
    clamped into the grid, so points beyond the grid's edge (beyond Nyquist) read the edge voxels.
    """
    flip = coords[..., 0] < 0
    c = torch.where(flip.unsqueeze(-1), -coords, coords)
    half, nx = size // 2, size // 2 + 1
    c0 = torch.floor(c)
    frac = c - c0
    # the lower corner clamped per axis with scalar bounds (a bounds tensor made from a list is a blocking host copy)
    x0 = c0[..., 0].clamp(0, nx - 2).long()
    y0 = c0[..., 1].clamp(-half, size - 2 - half).long()
    z0 = c0[..., 2].clamp(-half, size - 2 - half).long()
    base = ((z0 + half) * size + (y0 + half)) * nx + x0
    k = torch.arange(8, device=c.device)  # corner order: (dz, dy, dx) binary
    step = (k >> 2) * (size * nx) + ((k >> 1) & 1) * nx + (k & 1)
    flat = base.unsqueeze(-1) + step
    fx, fy, fz = frac.unbind(-1)
    wx = torch.stack([1 - fx, fx], -1)
    wy = torch.stack([1 - fy, fy], -1)
    wz = torch.stack([1 - fz, fz], -1)
    w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(-3)
    return flat, w, flip


MAX_POINTS = 1 << 22  # slice points interpolated at once; bounds the (points, 8 corners) temporaries


def extract_central_slices(
    transform: PaddedTransform, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor
) -> torch.Tensor:
    """Projections of the map at Fourier pixels (kx, ky) (j,) for rotations (..., r, 3, 3) -> (..., r, j) complex."""
    p = extract_central_slices_planar(transform, rotations, ky, kx)
    return torch.complex(p[..., 0, :], p[..., 1, :])


def extract_central_slices_planar(
    transform: PaddedTransform, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor
) -> torch.Tensor:
    """Projections as real and imaginary planes: (..., r, 2, j) real, so (r, 2j) rows [Re | Im] without a copy (the
    operand of the coarse pass's matrix products). Chunks of MAX_POINTS points are written into one output: no
    complex, conjugated or concatenated intermediates (they were most of a local search's coarse pass). On the CPU a
    compiled loop (cpu_kernels.py) does the same interpolation, on CUDA a fused kernel (extract_kernel.py)."""
    return _planar(transform, rotations, ky, kx, False)[0]


def extract_planar_with_power(
    transform: PaddedTransform, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """extract_central_slices_planar and the projections' power |P|² (..., r, j), computed as they are interpolated on
    the CPU (a pass over the planes less)."""
    planar, power = _planar(transform, rotations, ky, kx, True)
    assert power is not None
    return planar, power


def _planar(transform, rotations, ky, kx, with_power: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    lead = rotations.shape[:-2]
    flat_rot = rotations.reshape(-1, 3, 3)
    j = ky.numel()
    f = transform.f_padded
    out = torch.empty(flat_rot.shape[0], 2, j, dtype=f.real.dtype, device=f.device)
    power = None
    if f.device.type == "cpu":
        from . import cpu_kernels  # numba: imported only where it runs

        power = torch.empty(flat_rot.shape[0], j, dtype=out.dtype) if with_power else None
        cpu_kernels.extract_planar(f, flat_rot, ky, kx, transform.pad, out, power)
    else:
        if extract_kernel.available(f):
            extract_kernel.extract_fused(f, transform.pad, flat_rot, ky, kx, out)
        else:
            extract_by_grid_sample(transform, flat_rot, ky, kx, out)
        if with_power:
            power = torch.addcmul(out[:, 0] * out[:, 0], out[:, 1], out[:, 1])
    return out.reshape(*lead, 2, j), None if power is None else power.reshape(*lead, j)


def extract_by_grid_sample(
    transform: PaddedTransform, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, out: torch.Tensor
) -> None:
    """extract_central_slices_planar's interpolation by PyTorch operations (GPUs without Triton; the reference of the
    compiled kernels), rotations (r, 3, 3), into ``out`` (r, 2, j), in chunks of MAX_POINTS points."""
    step = max(1, MAX_POINTS // max(1, ky.numel()))
    for i in range(0, rotations.shape[0], step):
        _extract_into(transform, rotations[i : i + step], ky, kx, out[i : i + step])


def _xyz(x: float, yz: float, like: torch.Tensor) -> torch.Tensor:
    """(3,) [x, yz, yz] on like's device, filled in place (a tensor made from a list would be a blocking copy)."""
    v = torch.empty(3, dtype=like.dtype, device=like.device)
    v[0] = x
    v[1:] = yz
    return v


def _extract_into(
    transform: PaddedTransform, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, out: torch.Tensor
) -> None:
    """Trilinear interpolation as one fused torch grid_sample over the half transform's real and imaginary parts
    (8 corner reads per point and no (points × 8) temporaries: the gather version moved ~270 bytes per point),
    written into ``out`` (r, 2, j)."""
    f = transform.f_padded
    size, half = transform.size, transform.size // 2
    # grid_sample's normalised coordinates (align_corners): index i of an axis of n samples -> -1 + 2 i / (n - 1);
    # x runs 0..P/2, y and z are centred at P/2. Points past the edge read the edge (padding_mode="border").
    # The per-axis scales are folded into the (r, 2, 3) rotation rows, so the einsum gives scaled coordinates and
    # one where and one add finish the grid (no per-axis passes and stack over the points).
    s_yz, o_yz = 2.0 / (size - 1), 2.0 * half / (size - 1) - 1.0
    rows = rotations.to(f.real.dtype)[..., :2, :] * _xyz(2.0 / half, s_yz, f.real)
    k2 = torch.stack([kx, ky], dim=-1).to(rows.dtype)  # (j, 2)
    g = transform.pad * torch.einsum("jc,rcd->rjd", k2, rows)  # (r, j, 3) scaled (x, y, z)
    flip = g[..., :1] < 0  # read from the Friedel mate, conjugated
    grid = torch.where(flip, -g, g).add_(_xyz(-1.0, o_yz, g)).reshape(1, 1, 1, -1, 3)
    volume = torch.view_as_real(f).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 2, P, P, P/2 + 1): channels Re, Im
    vals = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    vals = vals.reshape(2, *out.shape[::2])  # (2, r, j)
    out[:, 0] = vals[0]
    torch.mul(vals[1], 1.0 - 2.0 * flip[..., 0].to(vals.dtype), out=out[:, 1])


def project_rfft(
    transform: PaddedTransform,
    rotations: torch.Tensor,
    max_shell: float | None = None,
    mag: tuple[float, float, float, float] = IDENTITY_MAG,
) -> torch.Tensor:
    """Whole projections (r, d, d//2+1) in rfft2 layout (phase origin at pixel d//2); zero beyond ``max_shell``
    (d/2). With an anisotropic magnification ``mag`` each pixel k shows the map's M·k (optics.py)."""
    from ..fourier.grids import rfft_freqs_2d

    d = transform.box
    ky, kx = rfft_freqs_2d(d, rotations.device, transform.f_padded.real.dtype)
    r_max = d / 2 if max_shell is None else max_shell
    inside = (kx**2 + ky**2) <= r_max**2
    idx = torch.nonzero(inside.flatten()).squeeze(1)
    map_kx, map_ky = magnified(kx.flatten()[idx], ky.flatten()[idx], mag)
    slices = extract_central_slices(transform, rotations, map_ky, map_kx)
    out = slices.new_zeros((*slices.shape[:-1], d * (d // 2 + 1)))
    out[..., idx] = slices
    return out.reshape(*slices.shape[:-1], d, d // 2 + 1)
