"""The coarse pass of a local search as one fused Triton kernel (CUDA, float32): each particle's candidate
projections are interpolated on the fly and scored against its translated images, never stored.

Written by hand because in a local search every particle has its own rotations: the PyTorch path extracts each
distinct rotation's slice (grid_sample), gathers them per particle into (m, L, 2j) blocks and multiplies — three
passes over memory for a small product (T translations per pixel), most of an order-5/6 iteration's coarse pass on
an H100. Here a program takes one particle and a block of its candidates and loops over the pixels: trilinear reads of
the padded transform (one 8-byte load per corner: these reads, scattered over the grid, set the pace), then a float32
(IEEE, not TF32) product with the image block.
The interpolation is extract.py's: Friedel mates read conjugated, coordinates clamped into the grid (grid_sample's
border mode, align_corners).
"""

from __future__ import annotations

import torch

try:  # CUDA builds of PyTorch ship Triton; CPU builds need neither
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# a program's (candidates, pixels per step, warps) for up to 16 translations, and for more: the fastest of the block
# shapes tried (bench/local_kernel.py). Up to 16: an order-7 local search's ~22 candidates per particle, T = 9, box 256
# at 115 px, H100 (2026-12-06, bench/local_kernel_sweeps.sh): 32 × 16 × 2 warps in 31.4 ms against 35.8 ms for the
# 16 × 32 × 4 chosen before on 192 random candidates; more: T = 21, 128 candidates, H200 (2026-12-05), 16 × 32 × 8
BLOCKS_FEW_TRANSLATIONS = (32, 16, 2)
BLOCKS_MANY_TRANSLATIONS = (16, 32, 8)
MAX_TRANSLATIONS = 64  # translations per launch


def available(t: torch.Tensor, precision: str) -> bool:
    """Whether the fused kernel can score operands like ``t`` (float32 on CUDA, Triton present, fp32 or tf32 precision:
    its products are IEEE float32 under both)."""
    return triton is not None and t.is_cuda and t.dtype == torch.float32 and precision in ("fp32", "tf32")


if triton is not None:
    from ..projection.trilinear_triton import sample

    @triton.jit(do_not_specialize=["T", "L", "jc", "size", "nx", "half"])
    def _local_scores(
        vol_ptr,
        rot_ptr,
        idx_ptr,
        count_ptr,
        kx_ptr,
        ky_ptr,
        a_ptr,
        b_ptr,
        cross_ptr,
        third_ptr,
        T,
        L,
        jc,
        size,
        nx,
        half,
        pad,
        BT: tl.constexpr,
        BL: tl.constexpr,
        BJ: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64)
        ls = tl.program_id(1) * BL + tl.arange(0, BL)
        lv = ls < L  # the candidates' slots, written
        lm = ls < tl.load(count_ptr + i)  # the valid ones, interpolated (the rest are padding: no loads)
        rb = rot_ptr + tl.load(idx_ptr + i * L + ls, mask=lm, other=0) * 9  # rows 0 and 1: the slice plane
        r00 = tl.load(rb + 0, mask=lm, other=0.0)
        r01 = tl.load(rb + 1, mask=lm, other=0.0)
        r02 = tl.load(rb + 2, mask=lm, other=0.0)
        r10 = tl.load(rb + 3, mask=lm, other=0.0)
        r11 = tl.load(rb + 4, mask=lm, other=0.0)
        r12 = tl.load(rb + 5, mask=lm, other=0.0)
        ts = tl.arange(0, BT)
        tm = ts < T
        acc = tl.zeros((BT, BL), dtype=tl.float32)
        third = tl.zeros((BL,), dtype=tl.float32)
        for j0 in range(0, jc, BJ):
            js = j0 + tl.arange(0, BJ)
            jm = js < jc
            kx = tl.load(kx_ptr + js, mask=jm, other=0.0)[None, :]
            ky = tl.load(ky_ptr + js, mask=jm, other=0.0)[None, :]
            x = pad * (r00[:, None] * kx + r10[:, None] * ky)  # (BL, BJ)
            y = pad * (r01[:, None] * kx + r11[:, None] * ky)
            z = pad * (r02[:, None] * kx + r12[:, None] * ky)
            pr, pi = sample(vol_ptr, x, y, z, lm[:, None] & jm[None, :], size, nx, half)
            am = tm[:, None] & jm[None, :]
            arow = a_ptr + i * T * 2 * jc + ts[:, None] * 2 * jc + js[None, :]
            a_re = tl.load(arow, mask=am, other=0.0)  # (BT, BJ)
            a_im = tl.load(arow + jc, mask=am, other=0.0)
            acc += tl.dot(a_re, tl.trans(pr), input_precision="ieee")
            acc += tl.dot(a_im, tl.trans(pi), input_precision="ieee")
            b = tl.load(b_ptr + i * jc + js, mask=jm, other=0.0)
            third += tl.sum((pr * pr + pi * pi) * b[None, :], axis=1)
        tl.store(cross_ptr + i * T * L + ts[:, None] * L + ls[None, :], acc, mask=tm[:, None] & lv[None, :])
        tl.store(third_ptr + i * L + ls, third, mask=lv)


def local_scores(
    transform,
    rotations: torch.Tensor,
    idx: torch.Tensor,
    ky: torch.Tensor,
    kx: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    precision: str = "fp32",
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cross (n, T, L) = a · [Re P | Im P] and third (n, L) = b · |P|² for each particle's candidates (float32 products:
    ``precision`` is there for the signature shared with expectation's PyTorch path: fp32 or tf32). ``counts`` (n,):
    each particle's valid candidates, the first of its row (PoseGrid.local_candidates pads the rest); the padding's
    scores are 0, not computed (None: all L are valid).

    transform: extract.PaddedTransform (its f_padded (P, P, P//2+1) complex64); rotations (U, 3, 3); idx (n, L) rows of
    ``rotations``; pixels (kx, ky) (jc,); a (n, T, 2jc) the particles' weighted translated images [Re | Im];
    b (n, jc) their weights of |P|².
    """
    f_padded, pad = transform.f_padded, transform.pad
    n, T, two_jc = a.shape
    L, jc = idx.shape[1], two_jc // 2
    size = f_padded.shape[0]
    cross = torch.empty(n, T, L, dtype=torch.float32, device=a.device)
    third = torch.empty(n, L, dtype=torch.float32, device=a.device)
    if n == 0 or L == 0:
        return cross, third
    # each complex64 voxel as one int64, read in one load and split into its float32 halves in registers
    vol = torch.view_as_real(f_padded.contiguous()).view(torch.int64)
    rot = rotations.to(torch.float32).contiguous()
    kx32, ky32, idx, b = (
        kx.to(torch.float32).contiguous(),
        ky.to(torch.float32).contiguous(),
        idx.contiguous(),
        b.contiguous(),
    )
    counts = torch.full((n,), L, device=a.device) if counts is None else counts.to(a.device, torch.int64).contiguous()
    for t0 in range(0, T, MAX_TRANSLATIONS):  # a program's (translations × candidates) block stays in registers
        t1 = min(T, t0 + MAX_TRANSLATIONS)
        part = cross if (t0, t1) == (0, T) else torch.empty(n, t1 - t0, L, dtype=torch.float32, device=a.device)
        bl, bj, warps = BLOCKS_FEW_TRANSLATIONS if t1 - t0 <= 16 else BLOCKS_MANY_TRANSLATIONS
        _local_scores[(n, triton.cdiv(L, bl))](
            vol,
            rot,
            idx,
            counts,
            kx32,
            ky32,
            a[:, t0:t1].contiguous(),
            b,
            part,
            third,
            t1 - t0,
            L,
            jc,
            size,
            size // 2 + 1,
            size // 2,
            float(pad),
            BT=max(16, triton.next_power_of_2(t1 - t0)),
            BL=bl,
            BJ=bj,
            num_warps=warps,
            num_stages=1,
        )  # no pipelined copies: they overran shared memory
        if part is not cross:
            cross[:, t0:t1] = part
    return cross, third
