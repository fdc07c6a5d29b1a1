"""Central-slice extraction as one fused Triton kernel (CUDA, float32): coordinates, Friedel flip and the trilinear
reads of every slice point in one pass, written as the real and imaginary planes extract.py returns.

Written by hand because the PyTorch path (extract.py's grid_sample) first builds every point's grid coordinates in
(r, j, 3) temporaries (a product, a select, an add, then a copy and a sign product of the result): on a local
search's order-6 fine pass on an H100 those passes took as long again as the interpolation itself. Same arithmetic as
that path (grid_sample's border mode, align_corners: coordinates clamped into the grid); only float rounding differs.
"""

from __future__ import annotations

import torch

try:  # CUDA builds of PyTorch ship Triton; CPU builds need neither
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK = 256
MAX_KERNEL_POINTS = 1 << 30  # points per launch: keeps the kernel's flat point index in int32


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernel can read transforms like ``t`` (complex64 on a CUDA device, Triton present)."""
    return triton is not None and t.is_cuda and t.dtype == torch.complex64


if triton is not None:
    from .trilinear_triton import sample

    # integer arguments unspecialised: Triton would otherwise compile anew for each window size J
    @triton.jit(do_not_specialize=["n_points", "J", "size", "nx", "half"])
    def _extract(vol_ptr, rot_ptr, kx_ptr, ky_ptr, out_ptr, n_points, J, size, nx, half, pad, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n_points
        r = offs // J
        j = offs - r * J
        kx = tl.load(kx_ptr + j, mask=live, other=0.0)
        ky = tl.load(ky_ptr + j, mask=live, other=0.0)
        rb = rot_ptr + r * 9  # rows 0 and 1 of the rotation: the slice plane
        x = pad * (kx * tl.load(rb + 0, mask=live, other=0.0) + ky * tl.load(rb + 3, mask=live, other=0.0))
        y = pad * (kx * tl.load(rb + 1, mask=live, other=0.0) + ky * tl.load(rb + 4, mask=live, other=0.0))
        z = pad * (kx * tl.load(rb + 2, mask=live, other=0.0) + ky * tl.load(rb + 5, mask=live, other=0.0))
        pr, pi = sample(vol_ptr, x, y, z, live, size, nx, half)
        row = out_ptr + r * 2 * J + j  # out (r, 2, J): the real plane, then the imaginary one
        tl.store(row, pr, mask=live)
        tl.store(row + J, pi, mask=live)


def extract_fused(
    f_padded: torch.Tensor, pad: int, rotations: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, out: torch.Tensor
) -> None:
    """Projections of the padded half transform ``f_padded`` (S, S, S//2+1) complex64 at pixels (kx, ky) (j,) under
    ``rotations`` (r, 3, 3), written into ``out`` (r, 2, j) float32 (contiguous) as real and imaginary planes."""
    size, J = f_padded.shape[0], ky.numel()
    vol = torch.view_as_real(f_padded.contiguous()).view(torch.int64)  # a voxel's (re, im) as one 8-byte word
    rot = rotations.to(torch.float32).contiguous()
    kx32, ky32 = kx.to(torch.float32).contiguous(), ky.to(torch.float32).contiguous()
    step = max(1, MAX_KERNEL_POINTS // max(1, J))
    for i in range(0, rot.shape[0], step):
        n = min(step, rot.shape[0] - i) * J
        _extract[(triton.cdiv(n, BLOCK),)](
            vol, rot[i:], kx32, ky32, out[i:], n, J, size, size // 2 + 1, size // 2, float(pad), BLOCK=BLOCK
        )
