"""Trilinear reads and writes of a padded 3D half transform on the CPU, as compiled loops (numba).

Written by hand because on the CPU PyTorch's path spends most of its time in temporaries: extraction by grid_sample
built (points, 3) coordinate grids and flipped copies and wrote planar copies of its output; insertion built
(points, 8 corners) index and weight arrays for index_add_. A loop that reads or writes the 8 corners of one point
at a time holds none of them: 5-8× faster on a 2-core machine (a local search's coarse pass was mostly extraction).
The GPU keeps its own kernels (extract.py's grid_sample, insert_kernel.py).

The geometry is extract.py's: a pixel (kx, ky) under rotation A is read at pad · (A[0]·kx + A[1]·ky) as (x, y, z),
points with x < 0 from their Friedel mate (conjugated); the grid is centred in z and y at index S//2.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numba
import numpy as np
import torch
from numba import njit, prange


def set_threads(n: int) -> None:
    """Use ``n`` threads in these loops (as torch.set_num_threads: --j)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


@njit(inline="always", cache=True)
def _plane(rot, r, pad):  # pragma: no cover - compiled
    """The padded grid's axes (x, y, z) along the image's kx and ky under rotation ``r``: pad·A[0], pad·A[1]."""
    return (pad * rot[r, 0, 0], pad * rot[r, 0, 1], pad * rot[r, 0, 2], pad * rot[r, 1, 0], pad * rot[r, 1, 1],
            pad * rot[r, 1, 2])  # fmt: skip


@njit(inline="always", cache=True)
def _point(plane, kx, ky):  # pragma: no cover - compiled
    """(x, y, z) of pixel (kx, ky) on ``plane`` (_plane)."""
    ax, ay, az, bx, by, bz = plane
    return kx * ax + ky * bx, kx * ay + ky * by, kx * az + ky * bz


@njit(parallel=True, cache=True)
def _extract(f, rot, ky, kx, pad, out, power):  # pragma: no cover - compiled; tested through extract_planar
    size, nx = f.shape[0], f.shape[2]
    half = size // 2
    for r in prange(rot.shape[0]):
        plane = _plane(rot, r, pad)
        for j in range(ky.shape[0]):
            x, y, z = _point(plane, kx[j], ky[j])
            sign = 1.0
            if x < 0:
                x, y, z, sign = -x, -y, -z, -1.0
            # grid_sample's border mode: the point is clamped into the grid, then interpolated
            x = min(max(x, 0.0), nx - 1.0)
            y = min(max(y + half, 0.0), size - 1.0)
            z = min(max(z + half, 0.0), size - 1.0)
            x0, y0, z0 = int(x), int(y), int(z)
            fx, fy, fz = x - x0, y - y0, z - z0
            x1, y1, z1 = min(x0 + 1, nx - 1), min(y0 + 1, size - 1), min(z0 + 1, size - 1)
            c00 = f[z0, y0, x0] * (1.0 - fx) + f[z0, y0, x1] * fx
            c01 = f[z0, y1, x0] * (1.0 - fx) + f[z0, y1, x1] * fx
            c10 = f[z1, y0, x0] * (1.0 - fx) + f[z1, y0, x1] * fx
            c11 = f[z1, y1, x0] * (1.0 - fx) + f[z1, y1, x1] * fx
            v = (c00 * (1.0 - fy) + c01 * fy) * (1.0 - fz) + (c10 * (1.0 - fy) + c11 * fy) * fz
            out[r, 0, j] = v.real
            out[r, 1, j] = sign * v.imag
            if power.shape[0]:
                power[r, j] = v.real * v.real + v.imag * v.imag


@njit(nogil=True, cache=True)
def _insert_rows(data, weight, rot, ky, kx, pad, values, weights, r0, r1):  # pragma: no cover - compiled
    size, nx = data.shape[0], data.shape[2]
    half = size // 2
    for r in range(r0, r1):
        plane = _plane(rot, r, pad)
        for j in range(ky.shape[0]):
            x, y, z = _point(plane, kx[j], ky[j])
            v = values[r, j]
            if x < 0:
                x, y, z, v = -x, -y, -z, np.conj(v)
            # extract.py's _trilinear_corners: the lower corner is clamped into the grid, the fractions are not
            fx0, fy0, fz0 = np.floor(x), np.floor(y), np.floor(z)
            fx, fy, fz = x - fx0, y - fy0, z - fz0
            x0 = min(max(int(fx0), 0), nx - 2)
            y0 = min(max(int(fy0), -half), size - 2 - half) + half
            z0 = min(max(int(fz0), -half), size - 2 - half) + half
            w = weights[r, j]
            for dz in range(2):
                wz = fz if dz else 1.0 - fz
                for dy in range(2):
                    wzy = wz * (fy if dy else 1.0 - fy)
                    for dx in range(2):
                        c = wzy * (fx if dx else 1.0 - fx)
                        data[z0 + dz, y0 + dy, x0 + dx] += v * c
                        weight[z0 + dz, y0 + dy, x0 + dx] += w * c


@cache
def _threads() -> ThreadPoolExecutor:
    """The insertion's threads, made once: numba's most (set_threads chooses how many an insertion uses)."""
    return ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, "cryorefine-insert")  # type: ignore[attr-defined]


PARALLEL_COPY_BYTES = 256 << 20  # the accumulator copies of a threaded insertion, at most: beyond, one thread


def _array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` as a C-contiguous numpy array of ``dtype`` (a view where it already is one)."""
    return np.ascontiguousarray(t.detach().to(dtype).numpy())


def extract_planar(f: torch.Tensor, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, pad: int,
                   out: torch.Tensor, power: torch.Tensor | None = None) -> None:  # fmt: skip
    """Central slices of the half transform ``f`` (S, S, S//2+1) complex at pixels (kx, ky) (j,) under ``rotations``
    (r, 3, 3), written into ``out`` (r, 2, j) as real and imaginary planes, and their power |P|² into ``power`` (r, j)
    if given; grid_sample's interpolation (border mode, align_corners) on the CPU."""
    real = f.real.dtype
    _extract(
        f.numpy(),
        _array(rotations, real),
        _array(ky, real),
        _array(kx, real),
        float(pad),
        out.numpy(),
        np.empty((0, 0), out.numpy().dtype) if power is None else power.numpy(),
    )


def insert(data: torch.Tensor, weight: torch.Tensor, pad: int, rotations: torch.Tensor, ky: torch.Tensor,
           kx: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> None:  # fmt: skip
    """Add ``values`` (r, j) complex with ``weights`` (r, j) at pixels (kx, ky) (j,) under ``rotations`` (r, 3, 3) into
    the accumulators ``data`` (S, S, S//2+1) complex and ``weight`` (same shape) real, in place (BackProjector.insert's
    meaning) on the CPU: on as many threads as copies of the accumulators fit PARALLEL_COPY_BYTES (the sums' order,
    so their rounding, depends on that number only)."""
    real = weight.dtype
    copy_bytes = data.numel() * data.element_size() + weight.numel() * weight.element_size()
    parts = max(1, min(numba.get_num_threads(), 1 + PARALLEL_COPY_BYTES // max(1, copy_bytes), rotations.shape[0]))
    d, w = data.numpy(), weight.numpy()
    args = (_array(rotations, real), _array(ky, real), _array(kx, real), float(pad), _array(values, data.dtype),
            _array(weights, real))  # fmt: skip
    n = rotations.shape[0]
    # the points of different rotations add into the same voxels: each of ``parts`` threads adds a share of the
    # rotations into its own zeroed copy (the first into the accumulators), then the copies are added in order. Python
    # threads around a nogil kernel, not numba's prange: the same work, and a first call that compiles in ~1 s where
    # the parallel kernel took ~11 s (every fresh install's first refinement paid it).
    copies = [(d, w)] + [(np.zeros_like(d), np.zeros_like(w)) for _ in range(parts - 1)]
    shares = [(p * n // parts, (p + 1) * n // parts) for p in range(parts)]
    if parts == 1:
        _insert_rows(d, w, *args, *shares[0])
    else:
        list(_threads().map(lambda p: _insert_rows(*copies[p], *args, *shares[p]), range(parts)))
        for cd, cw in copies[1:]:
            d += cd
            w += cw
