"""A global search's coarse scores assembled from the two matrix products in one pass over them (CUDA, Triton),
with the statistics the significant set needs: each block of BLOCK samples' largest score and Σ exp(score − largest).

Written by hand because the coarse array (n, K, T, R) is the E-step's largest (10^10 samples an iteration at order 3)
and on a GPU its passes, not the products, were most of a global iteration's non-GEMM time: 2·cross, − |P|² term,
+ offset prior, + direction prior, then the softmax's three passes and top-k's block maxima (estep/weights.py). Here
each element is read and written once; the significance step then reads it once more, for the mask
(weights.significant_from_blocks). The scores are the same floats as PyTorch's in-place path: (2·cross − third)
(exact, whether fused or not), + offset prior, + direction prior, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import TOPK_BLOCK

try:  # CUDA builds of PyTorch ship Triton; CPU builds need neither
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

COLUMNS_PER_PROGRAM = 1024  # rotations of one (particle, translation) row per program: 16 blocks


@dataclass(frozen=True)
class BlockStats:
    """Per particle, per block of TOPK_BLOCK consecutive samples of its flattened (K, T, R) scores: the block's
    largest score and Σ exp(score − largest) (0 for a block of −inf only). (n, K·T·R / TOPK_BLOCK) each."""

    largest: torch.Tensor
    sum_exp: torch.Tensor

    @classmethod
    def empty(cls, n: int, samples: int, device) -> "BlockStats":
        shape = (n, samples // TOPK_BLOCK)
        return cls(*(torch.empty(shape, dtype=torch.float32, device=device) for _ in range(2)))


def usable(cross_like: torch.Tensor, n_rotations: int) -> bool:
    """Whether scores like ``cross_like`` over ``n_rotations`` rotations can go through the kernel: float32 on CUDA,
    Triton present, and whole blocks in each translation's row of rotations."""
    return (
        triton is not None
        and cross_like.is_cuda
        and cross_like.dtype == torch.float32
        and n_rotations % TOPK_BLOCK == 0
    )


if triton is not None:

    @triton.jit(do_not_specialize=["T", "R", "rot_prior_stride", "stats_stride", "stats_offset"])
    def _assemble(
        cross_ptr,
        third_ptr,
        trans_prior_ptr,
        rot_prior_ptr,
        largest_ptr,
        sum_exp_ptr,
        T,
        R,
        rot_prior_stride,
        stats_stride,
        stats_offset,
        HAS_ROT_PRIOR: tl.constexpr,
        BR: tl.constexpr,
        B: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # particle i, translation t
        i, t = row // T, row % T
        start = tl.program_id(1) * BR
        cols = start + tl.arange(0, BR)
        ok = cols < R
        c = tl.load(cross_ptr + row * R + cols, mask=ok, other=0.0)
        s = 2.0 * c - tl.load(third_ptr + i * R + cols, mask=ok, other=0.0)
        s = s + tl.load(trans_prior_ptr + row)
        if HAS_ROT_PRIOR:
            s = s + tl.load(rot_prior_ptr + i * rot_prior_stride + cols, mask=ok, other=0.0)
        tl.store(cross_ptr + row * R + cols, s, mask=ok)
        blocks = tl.reshape(tl.where(ok, s, -float("inf")), (BR // B, B))
        largest = tl.max(blocks, axis=1)
        shift = tl.where(largest == -float("inf"), 0.0, largest)
        sum_exp = tl.sum(tl.exp(blocks - shift[:, None]), axis=1)
        first = start + tl.arange(0, BR // B) * B  # each block's first rotation
        at = i * stats_stride + stats_offset + (t * R + first) // B
        tl.store(largest_ptr + at, largest, mask=first < R)
        tl.store(sum_exp_ptr + at, sum_exp, mask=first < R)


def assemble_scores_(
    cross: torch.Tensor,
    third: torch.Tensor,
    trans_prior: torch.Tensor,
    rot_prior: torch.Tensor | None,
    stats: BlockStats,
    k: int,
) -> torch.Tensor:
    """Class k's scores 2·cross − third + trans_prior (+ rot_prior), written over ``cross`` (n, T, R) and returned, and
    their blocks' statistics written into ``stats``'s columns of class k (each class's T·R samples follow the last's).

    third (n, R) the |P|² term; trans_prior (n, T) the offset log prior; rot_prior (n or 1, R) the direction log prior
    or None (a uniform one)."""
    n, T, R = cross.shape
    if n == 0:
        return cross
    third, trans_prior = third.contiguous(), trans_prior.to(torch.float32).contiguous()
    rp = third if rot_prior is None else rot_prior.to(torch.float32).contiguous()  # third: a pointer, not read
    blocks_per_class = T * R // TOPK_BLOCK
    _assemble[(n * T, triton.cdiv(R, COLUMNS_PER_PROGRAM))](
        cross,
        third,
        trans_prior,
        rp,
        stats.largest,
        stats.sum_exp,
        T,
        R,
        rp.stride(0) if rp.shape[0] > 1 else 0,
        stats.largest.stride(0),
        k * blocks_per_class,
        HAS_ROT_PRIOR=rot_prior is not None,
        BR=COLUMNS_PER_PROGRAM,
        B=TOPK_BLOCK,
        num_warps=4,
    )
    return cross
