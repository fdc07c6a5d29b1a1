"""Reconstruction from back-projected accumulators: Wiener-type division, inverse transform, gridding correction."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..fourier.filters import soft_mask_outside_map
from ..fourier.grids import centred_half_radius, shell_sum
from ..projection.extract import sinc2_gridding_kernel
from ..projection.insert import BackProjector, enforce_hermitian_x0
from . import padded_fft
from .padded_fft import SAME_DEVICE, SlabDevices, blob_convolution, central_box_of_inverse

MIN_REGULARISED_SHELL = 5  # RELION's minres_map: no prior term on the lowest shells
GRIDDING_ITERATIONS = 10  # RELION 3.1's --gridding_iter (its default; RELION >= 4 skips them: --skip_gridding, 0)
BLOB_RADIUS, BLOB_ALPHA = 3.8, 15.0  # RELION's back-projector blob (TabFtBlob: 2 × 1.9 padded voxels, order 0)
BLOB_TABLE_STEP, BLOB_TABLE_SIZE = 0.5 / 10000, 10000  # its table: lookups round down to a sample, 0 past 0.5
# W's ceiling in the gridding iterations: W grows 10⁶-fold an iteration where no weight lies within the blob's reach
# (|conv| at its 10⁻⁶ floor), which overflows float32 by the 7th; there W multiplies zero weights and data only
W_CEILING = 1e30


def padded_shell_index(size: int, pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For the centred padded half grid (P, P, P//2+1): padded radius and original-grid shell round(R/pad)."""
    r = centred_half_radius(torch.arange(size, device=device) - size // 2, size // 2 + 1)
    return r, torch.round(r / pad).long()


def _hermitian_window(
    bp: BackProjector, max_shell: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accumulators with the x = 0 plane made Hermitian (enforce_hermitian_x0), cropped to the cube about the
    origin that holds the padded radii <= ``max_shell``·pad (default d/2; the whole stored grid when the cube reaches
    its edge): (data, weight, r_pad, shell), a centred half-grid cube (index i of its first two axes holds frequency
    i − n//2), with each voxel's padded radius and original-grid shell round(R/pad). An intermediate iteration's
    window is a small share of the grid: the M-step's float64 work is done on the cube."""
    max_shell = bp.box // 2 if max_shell is None else max_shell
    h = int(math.ceil(max_shell * bp.pad)) + 1
    if h >= bp.size // 2:
        data, weight = enforce_hermitian_x0(bp.data, bp.weight)
        r_pad, shell = padded_shell_index(bp.size, bp.pad, data.device)
        return data, weight, r_pad, shell
    c = bp.size // 2
    cube = slice(c - h, c + h + 1)  # centred on the origin (index h), so every x = 0 voxel's mate lies inside it
    data, weight = enforce_hermitian_x0(bp.data[cube, cube, : h + 1], bp.weight[cube, cube, : h + 1])
    k = torch.arange(-h, h + 1, device=data.device, dtype=torch.float64)
    kx = torch.arange(h + 1, device=data.device, dtype=torch.float64)
    r_pad = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return data, weight, r_pad, torch.round(r_pad / bp.pad).long()


def _shell_voxels(bp: BackProjector, n_shells: int, max_shell: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Original-grid shell and weight of every padded voxel inside ``max_shell`` (RELION's r² < r_max²·pad²)."""
    _, w, r_pad, shell = _hermitian_window(bp, max_shell)
    max_shell = bp.box // 2 if max_shell is None else max_shell
    inside = (r_pad < max_shell * bp.pad) & (shell < n_shells)
    return shell[inside], w[inside].to(torch.float64)


def reconstruction_noise_power(bp: BackProjector, n_shells: int, max_shell: int | None = None) -> torch.Tensor:
    """RELION's σ² of the reconstruction per shell (s,): 1/⟨pad³·weight⟩, the mean over all the shell's voxels
    inside ``max_shell`` (voxels without data count as 0); 0 for shells without weight."""
    shell, w = _shell_voxels(bp, n_shells, max_shell)
    total, count = shell_sum(bp.pad**3 * w, shell, n_shells), shell_sum(torch.ones_like(w), shell, n_shells)
    return torch.where(total > 1e-10, count / total.clamp(min=1e-300), torch.zeros_like(total))


def _voxel_data_vs_prior(
    bp: BackProjector, tau2: torch.Tensor, tau2_fudge: float, n_shells: int, max_shell: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shell and data-to-prior ratio of every padded voxel inside ``max_shell``: weight·pad³·T·τ² (RELION's
    invw / invtau2 in updateSSNRarrays; where τ² = 0, its stand-in prior gives 0.001·weight²)."""
    shell, w = _shell_voxels(bp, n_shells, max_shell)
    t = tau2.to(device=w.device, dtype=torch.float64)[shell.clamp(max=tau2.numel() - 1)]
    return shell, torch.where(t > 0, w * bp.pad**3 * tau2_fudge * t, 0.001 * w * w)


def data_vs_prior(
    bp: BackProjector, tau2: torch.Tensor, tau2_fudge: float, n_shells: int, max_shell: int | None = None
) -> torch.Tensor:
    """RELION's spectral data-to-prior ratio per shell (s,), which sets the resolution of a classification:
    the shell mean of the voxels' ratios; 999 for shells without voxels, 0 beyond ``max_shell``."""
    shell, ratio = _voxel_data_vs_prior(bp, tau2, tau2_fudge, n_shells, max_shell)
    total, count = shell_sum(ratio, shell, n_shells), shell_sum(torch.ones_like(ratio), shell, n_shells)
    out = torch.where(count > 0.001, total / count.clamp(min=1), torch.full_like(total, 999.0))
    last = bp.box // 2 if max_shell is None else max_shell
    out[last + 1 :] = 0.0
    return out


def fourier_completeness(
    bp: BackProjector, tau2: torch.Tensor, tau2_fudge: float, n_shells: int, max_shell: int | None = None
) -> torch.Tensor:
    """RELION's Fourier coverage per shell (s,), model.star's rlnFourierCompleteness: the fraction of the shell's
    padded voxels inside ``max_shell`` whose data-to-prior ratio is at least 1 (SNR > 1); 0 where none lie."""
    shell, ratio = _voxel_data_vs_prior(bp, tau2, tau2_fudge, n_shells, max_shell)
    hits, count = shell_sum((ratio >= 1).double(), shell, n_shells), shell_sum(torch.ones_like(ratio), shell, n_shells)
    return torch.where(count > 0, hits / count.clamp(min=1), torch.zeros_like(hits))


def overall_completeness(completeness, ssnr) -> float:
    """RELION's calculateTotalFourierCoverage (rlnOverallFourierCompleteness): the shells' completeness averaged
    over the integer frequencies k of the cube |k_x|, |k_y|, |k_z| < m with ⌊|k|⌋ <= m, where m is the last shell
    (from 0) before the SSNR first drops below 1; 0 when it is below at shell 0 (RELION divides 0 by 0)."""
    ssnr = torch.as_tensor(ssnr, dtype=torch.float64).cpu()
    below = (ssnr < 1).nonzero()
    m = int(below[0, 0]) - 1 if below.numel() else len(ssnr) - 1
    if m < 1:
        return 0.0
    counts = _cube_shell_counts(m)
    c = torch.as_tensor(completeness, dtype=torch.float64).cpu()[: m + 1]
    return float((counts * c).sum() / counts.sum())


@functools.lru_cache(maxsize=8)
def _cube_shell_counts(m: int) -> torch.Tensor:
    """(m + 1,) how many integer frequencies of the cube |k_x|, |k_y|, |k_z| < m lie at each ⌊|k|⌋ <= m. Kept per m:
    every model.star of an iteration asks for the same m (three in auto-refine's last). Counted from the histogram
    of the (|k_x|, |k_y|) plane's squared radii, one |k_z| at a time (each sign of a non-zero coordinate counts): a
    loop over the whole cube's planes took ~40 ms at box 100 and seconds at box 600."""
    k = np.arange(m)
    sides = np.where(k == 0, 1.0, 2.0)  # ±k
    plane = np.bincount((k[:, None] ** 2 + k[None, :] ** 2).ravel(), weights=np.outer(sides, sides).ravel())
    counts = np.zeros(m + 1)
    for kz, w in zip(k.tolist(), sides):
        top = min(len(plane), (m + 1) ** 2 - kz * kz)  # squared radii below (m + 1)²: shells up to m
        shell = np.floor(np.sqrt(np.arange(top, dtype=np.float64) + kz * kz)).astype(np.int64)
        counts += w * np.bincount(shell, weights=plane[:top], minlength=m + 1)
    return torch.from_numpy(counts)


def weight_floor(weight: torch.Tensor, r_pad: torch.Tensor, pad: int, max_shell: int) -> torch.Tensor:
    """RELION's guard against dividing by tiny weights (BackProjector::reconstruct, the path without gridding
    iterations, RELION >= 4's default): per shell floor(R/pad), 1/1000 of the mean weight of all the shell's voxels
    (those without data count as 0) inside R² < round((max_shell·pad)²); beyond max_shell, the last shell's floor.
    Returns the floor of every voxel (same shape as ``weight``)."""
    w = weight.to(torch.float64)
    shell = torch.floor(r_pad / pad).long()
    within = torch.round(r_pad**2) < round((max_shell * pad) ** 2)
    n = max(int(max_shell), 1)
    s = shell[within].clamp(max=n - 1)
    total, count = shell_sum(w[within], s, n), shell_sum(torch.ones_like(s, dtype=torch.float64), s, n)
    radial = total / (1000.0 * count.clamp(min=1))
    return radial[shell.clamp(max=n - 1)]


def gridding_grid_size(pad: int, max_shell: int) -> int:
    """Edge of the grid RELION's gridding iterations run on (its BackProjector's pad_size): 2·(round(pad·r_max) + 1) + 1
    for the window's r_max = ``max_shell`` (its back-projectors are sized by the current image size): small while the
    window is, P + 3 for the whole map. The convolution is circular on this grid, so the grid is part of the answer."""
    return 2 * (round(pad * max_shell) + 1) + 1


def blob_fourier_multiplier(
    size: int, rows: tuple[int, int] | None = None, device=None, padded_size: int | None = None
) -> torch.Tensor:
    """(N, N, N) real-space factor of RELION's convoluteBlobRealSpace on an N = ``size``-point grid (origin at index 0,
    wrapped as RELION does: indices from N//2 are negative, also for odd N), or its z ``rows`` (z0, z1) only: the
    Fourier transform of its Kaiser-Bessel blob (order 0, radius 3.8 padded voxels, α 15) at r / P, P =
    ``padded_size`` (default N; RELION divides by the padded map's edge whatever grid it is on), from RELION's table
    (rounded down to a sample; 0 beyond 0.5), relative to its value at 0. For order 0 that transform is
    ∝ I_{3/2}(σ)/σ^{3/2} with σ = √(α² − (2π·a·w)²) (Lewitt 1990; 2π·a·w < α over the table)."""
    k = torch.arange(size, dtype=torch.float64, device=device)
    k = torch.where(k < size // 2, k, k - size)
    kz = k if rows is None else k[rows[0] : rows[1]]
    r = torch.sqrt(kz[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    idx = torch.floor(r / (padded_size or size) / BLOB_TABLE_STEP).clamp(max=BLOB_TABLE_SIZE).long()
    return _blob_table(str(device if device is not None else "cpu"))[idx]


@functools.lru_cache(maxsize=4)
def _blob_table(device: str) -> torch.Tensor:
    """(BLOB_TABLE_SIZE + 1,) the blob's transform at RELION's table samples relative to 0, and 0 past the table."""
    w = torch.arange(BLOB_TABLE_SIZE, dtype=torch.float64, device=device) * BLOB_TABLE_STEP

    def profile(w: torch.Tensor) -> torch.Tensor:
        sigma = torch.sqrt(BLOB_ALPHA**2 - (2 * math.pi * BLOB_RADIUS * w) ** 2)
        i15 = torch.sqrt(2 / (math.pi * sigma)) * (torch.cosh(sigma) - torch.sinh(sigma) / sigma)
        return i15 / sigma**1.5

    return torch.cat([profile(w) / profile(torch.zeros(1, dtype=torch.float64, device=device)), w.new_zeros(1)])


def gridding_weights(
    weight: torch.Tensor,
    inside: torch.Tensor,
    iterations: int,
    size: int,
    devices: SlabDevices = SAME_DEVICE,
    padded_size: int | None = None,
) -> torch.Tensor:
    """RELION 3.1's iterative density compensation (Pipe & Menon 1999) of the padded accumulators: W₀ = 1 inside the
    window, then W ← W / max(10⁻⁶, |(W·weight) ∗ blob|) ``iterations`` times, the convolution done on a ``size``-point
    grid (gridding_grid_size) as a product with the blob's transform in real space (padded_fft: by slabs;
    blob_fourier_multiplier with ``padded_size``).
    ``weight`` is a centred half-grid cube (n, n, m) about the origin that holds every voxel of the window (zero
    outside), with the prior term, in RELION's units per particle (normalised by the particle count, as RELION's
    M-step: that sets where the 10⁻⁶ floor acts); ``inside`` the voxels within the window; ``devices``: where the
    transforms and their buffer are (padded_fft.SlabDevices). Returns W (same shape, float32): the map is data·W
    instead of data/weight.
    Precision (RELION works in double): the first iteration in ``weight``'s (float64 from reconstruct()), as its
    convolution spans the weights' whole range (10⁴ and more from the origin to the window's edge; float32 transforms
    leave errors there that the later iterations correct only slowly); the others, where W·weight is near 1 everywhere,
    in float32, whose transforms move half the bytes. The map then differs from float64's by ~1e-6 of its peak
    (tests/reconstruction/test_padded_fft.py)."""
    w_new = inside.to(weight.dtype)
    if iterations > 0:
        w_new = _gridding_iterations(w_new, weight, inside, 1, size, devices, padded_size)
    if iterations > 1:
        w_new = _gridding_iterations(w_new.float(), weight.float(), inside, iterations - 1, size, devices, padded_size)
    return w_new.float()


def _gridding_iterations(
    w_new: torch.Tensor,
    weight: torch.Tensor,
    inside: torch.Tensor,
    iterations: int,
    size: int,
    devices: SlabDevices,
    padded_size: int | None,
) -> torch.Tensor:
    """gridding_weights' iterations from W = ``w_new``, in ``weight``'s precision."""
    on = devices.transforms or weight.device

    def rows_of(rows: tuple[int, int]) -> torch.Tensor:
        return blob_fourier_multiplier(size, rows, on, padded_size).to(weight.dtype)

    # the factor is made once (by slabs) when the whole of it is at most a slab's bytes, else a slab's rows when the
    # slab is transformed
    whole = None
    if 8 * size**3 <= padded_fft.SLAB_BYTES:
        whole = torch.cat([rows_of(r) for r in padded_fft.row_slabs(size)])

    def multiplier(z0: int, z1: int) -> torch.Tensor:
        return whole[z0:z1] if whole is not None else rows_of((z0, z1))

    # W, the weights and the window by x columns: views of the cube, or (transforms on another device) x-major copies
    # in pinned memory, so that each slab is one contiguous transfer
    apart = on != weight.device
    by_x = [_x_major(t, apart) for t in (w_new, weight, inside)]

    def slab(t: torch.Tensor, x0: int, x1: int) -> torch.Tensor:
        return t[x0:x1].to(on, non_blocking=True).permute(1, 2, 0) if apart else t[:, :, x0:x1]

    def columns(x0: int, x1: int) -> torch.Tensor:  # W·weight, a slab at a time on the transforms' device
        return slab(by_x[0], x0, x1) * slab(by_x[1], x0, x1)

    def update(x0: int, x1: int, conv: torch.Tensor) -> None:  # W / max(10⁻⁶, |conv|) inside the window
        w = slab(by_x[0], x0, x1)
        new = torch.where(slab(by_x[2], x0, x1), w / conv.clamp(min=1e-6), w).clamp_(max=W_CEILING)
        if apart:
            by_x[0][x0:x1].copy_(new.permute(2, 0, 1))
        else:
            by_x[0][:, :, x0:x1] = new

    n, m = weight.shape[0], weight.shape[2]
    for _ in range(iterations):
        blob_convolution(columns, n, m, size, multiplier, update, devices, weight)
    return by_x[0].permute(1, 2, 0) if apart else by_x[0]


def _x_major(t: torch.Tensor, apart: bool) -> torch.Tensor:
    """``t`` (n, n, m) as it is, or (``apart``) as an (m, n, n) contiguous copy in pinned memory."""
    if not apart:
        return t
    out = torch.empty(t.shape[2], t.shape[0], t.shape[1], dtype=t.dtype, pin_memory=torch.cuda.is_available())
    return out.copy_(t.permute(2, 0, 1))


def reconstruct(
    bp: BackProjector,
    tau2: torch.Tensor | None = None,
    tau2_fudge: float = 1.0,
    max_shell: int | None = None,
    min_regularised_shell: int = MIN_REGULARISED_SHELL,
    gridding_iterations: int = GRIDDING_ITERATIONS,
    particles: float = 1.0,
    devices: SlabDevices = SAME_DEVICE,
) -> torch.Tensor:
    """(d, d, d) real map from accumulators, as RELION's BackProjector::reconstruct.

    The denominator is weight + 1/(pad³·T·τ²(s)) for shells s >= ``min_regularised_shell`` where τ² > 0 (τ² in
    unpadded units, RELION's regulariser), the weight elsewhere (``tau2=None``: the unregularised ``_unfil`` map);
    where τ² = 0 RELION's stand-in prior 1/(0.001·weight) is used. With ``gridding_iterations`` (RELION 3.1's
    default, 10) the map is data·W with W from :func:`gridding_weights` on RELION's grid for the window
    (gridding_grid_size: the iterations of a low-resolution window are cheap, and their circular convolution is
    RELION's; ``particles``: the accumulators' particle count, RELION's normalisation); with 0 (RELION >= 4's
    default) data / max(denominator, :func:`weight_floor`).
    Components beyond ``max_shell`` (default d/2) are zero. Then inverse FFT, crop, RELION's soft mask outside the box's
    inscribed sphere (corners to their mean), divide by sinc². ``devices``: where the padded transforms run and keep
    their buffer (padded_fft.SlabDevices; default the accumulators' device).
    """
    d, pad, size = bp.box, bp.pad, bp.padded_size
    data, weight, r_pad, shell = _hermitian_window(bp, max_shell)
    max_shell = d // 2 if max_shell is None else max_shell
    out_dtype, denom = weight.dtype, weight.to(torch.float64)
    del weight  # each cube-sized array goes as soon as it is used: they set the M-step's memory
    if tau2 is not None:
        denom += _regulariser(denom, shell, tau2.to(device=data.device, dtype=torch.float64), pad**3 * tau2_fudge,
                              min_regularised_shell)  # fmt: skip
    del shell
    if gridding_iterations > 0:
        # on RELION's grid for the window (the blob's convolution is a product in real space), in RELION's units: its
        # transforms are 1/N-normalised, so its weights are d⁴ times ours, and per particle
        inside = torch.round(r_pad**2) < round(max_shell * pad) ** 2
        del r_pad
        units = float(d) ** 4 / particles
        grid = gridding_grid_size(pad, max_shell)
        w_new = gridding_weights(denom.mul_(units), inside, gridding_iterations, grid, devices, padded_size=size)
        del denom
        # in double: W at its ceiling (no weight within the blob's reach) times the units passes float32's range
        # for a class of few particles in a big box (d⁴ / particles); there the data are 0 and so is the product
        f = data.to(torch.complex128).mul_(w_new).mul_(units)
    else:
        denom = torch.maximum(denom, weight_floor(denom, r_pad, pad, max_shell))
        inside = (r_pad <= max_shell * pad) & (denom > 0)
        del r_pad
        f = data.to(torch.complex128).div_(denom.clamp_(min=1e-300))
    del data
    f.masked_fill_(~inside, 0)
    vol = soft_mask_outside_map(central_box_of_inverse(f, size, d, devices))
    vol = vol / sinc2_gridding_kernel(d, pad, vol.device, vol.dtype)
    if not bool(torch.isfinite(vol).all()):  # stop here: written, it would be the next E-step's reference
        raise FloatingPointError(
            f"reconstruction of a box-{d} map holds NaN or Inf (accumulators of {particles:g} particles); "
            "the map was not written"
        )
    return vol.to(out_dtype)


def _regulariser(
    denom: torch.Tensor, shell: torch.Tensor, tau2: torch.Tensor, scale: float, min_shell: int
) -> torch.Tensor:
    """reconstruct()'s prior term per voxel: 1/(scale·τ²(shell)) (scale = pad³·T) where τ² > 0, RELION's stand-in
    1/(0.001·weight) where it is 0 (0 where the weight is), nothing below ``min_shell``; built in place."""
    t = tau2[shell.clamp(max=tau2.numel() - 1)]
    has_prior = t > 0
    reg = t.clamp_(min=1e-300).mul_(scale).reciprocal_()
    stand_in = (denom * 0.001).clamp_(min=1e-300).reciprocal_().masked_fill_(~(denom > 1e-20), 0.0)
    reg = torch.where(has_prior, reg, stand_in)
    del stand_in
    return reg.masked_fill_(shell < min_shell, 0.0)
