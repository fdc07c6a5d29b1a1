"""Central-slice extraction as one fused Triton kernel (CUDA, float32): coordinates, Friedel flip and the trilinear
reads of every slice point in one pass, written as the real and imaginary planes extract.py returns.

Written by hand because the PyTorch path (extract.py's grid_sample) first builds every point's grid coordinates in
(r, j, 3) temporaries (a product, a select, an add, then a copy and a sign product of the result): on a local
search's order-6 fine pass on an H100 those passes took as long again as the interpolation itself. Same arithmetic as
that path (grid_sample's border mode, align_corners: coordinates clamped into the grid); only float rounding differs.
"""

from __future__ import annotations

import torch

from .trilinear_triton import BLOCK, point_launches, triton


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernel can read transforms like ``t`` (complex64 on a CUDA device, Triton present)."""
    return triton is not None and t.is_cuda and t.dtype == torch.complex64


if triton is not None:
    import triton.language as tl

    from .trilinear_triton import sample, slice_point

    # integer arguments unspecialised: Triton would otherwise compile anew for each window size J
    @triton.jit(do_not_specialize=["n_points", "J", "size", "nx", "half"])
    def _extract(vol_ptr, rot_ptr, kx_ptr, ky_ptr, out_ptr, n_points, J, size, nx, half, pad, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n_points
        r, j, x, y, z = slice_point(rot_ptr, kx_ptr, ky_ptr, offs, live, J, pad)
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
    for i, n in point_launches(rot.shape[0], J):
        _extract[(triton.cdiv(n, BLOCK),)](
            vol, rot[i:], kx32, ky32, out[i:], n, J, size, size // 2 + 1, size // 2, float(pad), BLOCK=BLOCK
        )
