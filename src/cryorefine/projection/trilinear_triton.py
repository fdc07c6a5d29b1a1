"""Slice points and trilinear interpolation on the padded half grid inside Triton kernels (insert_kernel.py,
extract_kernel.py, estep/fused_local.py); the Triton import they share."""

from __future__ import annotations

from collections.abc import Iterator

try:  # CUDA builds of PyTorch ship Triton; CPU builds need neither
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK = 256  # slice points per program of the point-wise kernels (insertion, extraction)
MAX_KERNEL_POINTS = 1 << 30  # points per launch: keeps the kernels' flat point index in int32


def point_launches(n_rotations: int, J: int) -> Iterator[tuple[int, int]]:
    """(first rotation, points) of each launch of a point-wise kernel over n_rotations slices of J pixels."""
    step = max(1, MAX_KERNEL_POINTS // max(1, J))
    for i in range(0, n_rotations, step):
        yield i, min(step, n_rotations - i) * J


if triton is not None:

    @triton.jit
    def slice_point(rot_ptr, kx_ptr, ky_ptr, offs, live, J, pad):
        """Flat slice points ``offs`` (rotation r = offs // J, pixel j) -> (r, j, x, y, z): the padded coordinates
        pad · (kx · A[0] + ky · A[1]) from rows 0 and 1 of rotation r (r, 3, 3) (the slice plane)."""
        r = offs // J
        j = offs - r * J
        kx = tl.load(kx_ptr + j, mask=live, other=0.0)
        ky = tl.load(ky_ptr + j, mask=live, other=0.0)
        rb = rot_ptr + r * 9
        x = pad * (kx * tl.load(rb + 0, mask=live, other=0.0) + ky * tl.load(rb + 3, mask=live, other=0.0))
        y = pad * (kx * tl.load(rb + 1, mask=live, other=0.0) + ky * tl.load(rb + 4, mask=live, other=0.0))
        z = pad * (kx * tl.load(rb + 2, mask=live, other=0.0) + ky * tl.load(rb + 5, mask=live, other=0.0))
        return r, j, x, y, z

    @triton.jit
    def corner(base, fx, fy, fz, plane, nx, c: tl.constexpr):
        """Flat voxel index and trilinear weight of corner ``c`` (bits dz, dy, dx) of the cell at ``base``, for the
        fractional position (fx, fy, fz) inside it; ``plane`` = voxels per z plane, ``nx`` per row."""
        dz: tl.constexpr = c // 4
        dy: tl.constexpr = (c // 2) % 2
        dx: tl.constexpr = c % 2
        w = (fz if dz else 1.0 - fz) * (fy if dy else 1.0 - fy) * (fx if dx else 1.0 - fx)
        return base + dz * plane + dy * nx + dx, w

    @triton.jit
    def sample(vol_ptr, x, y, z, live, size, nx, half):
        """(re, im) of the padded half transform at padded coordinates (x, y, z) (blocks of any shape) where ``live``:
        points with x < 0 read at their Friedel mate, conjugated; coordinates clamped into the grid (extract.py's
        grid_sample border mode, align_corners). ``vol_ptr``: the transform's complex64 voxels as int64, each voxel one
        8-byte load split into its float32 halves in registers (these scattered reads set the pace)."""
        flip = x < 0
        x = tl.minimum(tl.where(flip, -x, x), nx - 1.0)
        y = tl.minimum(tl.maximum(tl.where(flip, -y, y), -half * 1.0), size - 1.0 - half)
        z = tl.minimum(tl.maximum(tl.where(flip, -z, z), -half * 1.0), size - 1.0 - half)
        x0 = tl.minimum(tl.floor(x), nx - 2.0)
        y0 = tl.minimum(tl.floor(y), size - 2.0 - half)
        z0 = tl.minimum(tl.floor(z), size - 2.0 - half)
        fx = x - x0
        fy = y - y0
        fz = z - z0
        base = ((z0.to(tl.int64) + half) * size + (y0.to(tl.int64) + half)) * nx + x0.to(tl.int64)
        plane = size * nx
        pr = tl.zeros(x.shape, dtype=tl.float32)
        pi = tl.zeros(x.shape, dtype=tl.float32)
        for c in tl.static_range(8):
            v, wc = corner(base, fx, fy, fz, plane, nx, c)
            w = tl.load(vol_ptr + v, mask=live, other=0)
            pr += wc * (w & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            pi += wc * (w >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        return pr, tl.where(flip, -pi, pi)
