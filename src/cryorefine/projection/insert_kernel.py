"""Back-projection as one fused Triton kernel (CUDA, float32): coordinates, Friedel flip, trilinear weights and the
8-corner atomic adds of every slice point in one pass.

Written by hand because the PyTorch path (insert.py) materialises every point's 8 corner indices, weights and
weighted values (~100 bytes per point) before two index_add_ scatters: at a local search's HEALPix order 6 that was
~0.6 s of an iteration's 1.3 s storeWeightedSums on an H100, against ~0.3 s for the atomic adds themselves.
Same arithmetic as insert.py's path (lower corner clamped, weights from the unclamped position); only the order of
the float additions differs.
The atomic adds set the pace (a local search's order-6 iteration on an H100: 0.55 s of its 1.46 s of kernels). On
compute capability 9.0 and later a corner's (re, im, weight) goes as one 16-byte vector reduction (PTX
red.global.add.v4.f32, which Triton's atomic_add does not emit) into an interleaved (re, im, weight, unused) grid,
added to the accumulators after the launch: one request a corner where three scalar adds were (H100: 1.00e10 points/s
against 3.48e9; bench/insert_timing.py). That grid is a transient 16 bytes a voxel, which the memory budget does not
plan for: it is made where it fits QUAD_GRID_BYTES, or half the memory the caller says is spare at the insertion (a
tile's temporaries are gone by then: the full TRPV1-like set's order-8 grids of 464 voxels, 0.8 GB, on an 80 GB card);
else the (re, im) pair goes as one 8-byte reduction and the weight as a scalar add into the accumulators themselves
(5.13e9 points/s), as for a big box's whole grid on a small card.
"""

from __future__ import annotations

import torch

from .trilinear_triton import BLOCK, point_launches, triton


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernel can insert into accumulators like ``t`` (float32 on a CUDA device, Triton present)."""
    return triton is not None and t.is_cuda and t.dtype == torch.float32


WIDTHS = (1, 2, 4)  # float32 values per reduction: scalar atomics, (re, im) pairs, (re, im, weight, 0) quads
QUAD_GRID_BYTES = 256 << 20  # an interleaved grid made for quads whatever the spare memory (~80 shells at --pad 2)


def reduction_width(capability: tuple[int, int], voxels: int, spare_bytes: int = 0) -> int:
    """The reduction width for a GPU of compute ``capability`` and a grid of ``voxels``: float32 vector reductions from
    9.0, as quads where their interleaved grid stays within QUAD_GRID_BYTES or half of ``spare_bytes`` (memory that may
    be allocated now), else pairs; scalar atomics before 9.0."""
    if capability < (9, 0):
        return 1
    return 4 if 16 * voxels <= max(QUAD_GRID_BYTES, spare_bytes // 2) else 2


if triton is not None:
    import triton.language as tl

    from .trilinear_triton import corner, slice_point

    @triton.jit
    def _add_pair(ptr, re, im, live):
        """Add (re, im) to the two float32 at ``ptr`` (8-byte aligned) where ``live``, as one vector reduction."""
        return tl.inline_asm_elementwise(  # the address as an integer: the operands are broadcast as arithmetic ones
            "{ .reg .pred p; setp.ne.b32 p, $4, 0; @p red.global.add.v2.f32 [$1], {$2, $3}; mov.b32 $0, 0; }",
            "=r,l,f,f,r",
            [ptr.to(tl.int64), re, im, live.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _add_quad(ptr, re, im, w, live):
        """Add (re, im, w, 0) to the four float32 at ``ptr`` (16-byte aligned) where ``live``: one vector reduction."""
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .f32 z; setp.ne.b32 p, $5, 0; mov.f32 z, 0f00000000; "
            "@p red.global.add.v4.f32 [$1], {$2, $3, $4, z}; mov.b32 $0, 0; }",
            "=r,l,f,f,f,r",
            [ptr.to(tl.int64), re, im, w, live.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    # integer arguments unspecialised: Triton would otherwise compile anew for each window size J (~0.5 s each)
    @triton.jit(do_not_specialize=["n_points", "J", "size", "nx", "half"])
    def _insert(
        rot_ptr,
        kx_ptr,
        ky_ptr,
        val_ptr,
        wgt_ptr,
        data_ptr,
        weight_ptr,
        n_points,
        J,
        size,
        nx,
        half,
        pad,
        BLOCK: tl.constexpr,
        WIDTH: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n_points
        r, j, x, y, z = slice_point(rot_ptr, kx_ptr, ky_ptr, offs, live, J, pad)
        re = tl.load(val_ptr + 2 * offs, mask=live, other=0.0)
        im = tl.load(val_ptr + 2 * offs + 1, mask=live, other=0.0)
        wv = tl.load(wgt_ptr + offs, mask=live, other=0.0)
        flip = x < 0  # insert at the Friedel mate, conjugated
        x = tl.where(flip, -x, x)
        y = tl.where(flip, -y, y)
        z = tl.where(flip, -z, z)
        im = tl.where(flip, -im, im)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        z0f = tl.floor(z)
        fx = x - x0f
        fy = y - y0f
        fz = z - z0f
        x0 = tl.minimum(tl.maximum(x0f, 0.0), nx - 2.0).to(tl.int64)
        y0 = tl.minimum(tl.maximum(y0f, -half * 1.0), size - 2.0 - half).to(tl.int64)
        z0 = tl.minimum(tl.maximum(z0f, -half * 1.0), size - 2.0 - half).to(tl.int64)
        base = ((z0 + half) * size + (y0 + half)) * nx + x0
        plane = size * nx
        for c in tl.static_range(8):
            idx, wc = corner(base, fx, fy, fz, plane, nx, c)
            if WIDTH == 4:  # data_ptr: the interleaved grid
                _add_quad(data_ptr + 4 * idx, re * wc, im * wc, wv * wc, live)
            else:
                if WIDTH == 2:
                    _add_pair(data_ptr + 2 * idx, re * wc, im * wc, live)
                else:
                    tl.atomic_add(data_ptr + 2 * idx, re * wc, mask=live, sem="relaxed")
                    tl.atomic_add(data_ptr + 2 * idx + 1, im * wc, mask=live, sem="relaxed")
                tl.atomic_add(weight_ptr + idx, wv * wc, mask=live, sem="relaxed")


def insert_fused(
    data: torch.Tensor,
    weight: torch.Tensor,
    pad: int,
    rotations: torch.Tensor,
    ky: torch.Tensor,
    kx: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    width: int | None = None,
    spare_bytes: int = 0,
) -> None:
    """Add ``values`` (r, j) complex64 and ``weights`` (r, j) at pixels (kx, ky) (j,) under ``rotations`` (r, 3, 3)
    into ``data`` (P, P, P//2+1) complex64 and ``weight`` (same shape) float32, in place. ``width``: float32 values
    per reduction (WIDTHS; default: reduction_width's for this GPU, grid and ``spare_bytes``)."""
    if width is None:
        width = reduction_width(torch.cuda.get_device_capability(data.device), weight.numel(), spare_bytes)
    assert width in WIDTHS, width
    size = data.shape[0]
    J = ky.numel()
    rot = rotations.to(torch.float32).contiguous()
    kx32, ky32 = kx.to(torch.float32).contiguous(), ky.to(torch.float32).contiguous()
    vals = torch.view_as_real(values.to(torch.complex64).contiguous())
    wgts = weights.to(torch.float32).contiguous()
    acc = torch.view_as_real(data)
    if width == 4:  # (re, im, weight, unused) per voxel, 16-byte aligned: one request a corner
        acc = torch.zeros(*weight.shape, 4, dtype=torch.float32, device=weight.device)
    for i, n in point_launches(rot.shape[0], J):
        _insert[(triton.cdiv(n, BLOCK),)](
            rot[i:],
            kx32,
            ky32,
            vals[i:],
            wgts[i:],
            acc,
            weight,
            n,
            J,
            size,
            size // 2 + 1,
            size // 2,
            float(pad),
            BLOCK=BLOCK,
            WIDTH=width,
        )
    if width == 4:
        torch.view_as_real(data).add_(acc[..., :2])
        weight.add_(acc[..., 2])
