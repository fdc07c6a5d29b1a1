"""Trilinear interpolation on the padded half grid inside Triton kernels (insert_kernel.py, extract_kernel.py,
estep/fused_local.py)."""

from __future__ import annotations

try:  # CUDA builds of PyTorch ship Triton; CPU builds need neither
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:

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
