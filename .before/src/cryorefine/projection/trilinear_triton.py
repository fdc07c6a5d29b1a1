"""Trilinear corners on the padded half grid inside Triton kernels (insert_kernel.py, estep/fused_local.py)."""

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
