"""Precision of the coarse pass's matrix products (--precision): tf32 (default on a GPU), fp32 or scaled fp16.

tf32 is the default since 2026-12-06: on an H100 it kept every run's gold-standard shell, FSC to the truth and pose
errors (TRPV1-like 5,000 particles, seeds 0 and 1: 3.84 Å as fp32's; the full 35,645: 3.05 Å as fp32's; betagal-like
seed 1: 7.87 Å as fp32's, bench/results/2026-12-06d-device-runs.md, 2026-12-05e-device-runs.md), and the full set's
iterations 6-8 (global at HEALPix order 3, then the first local one) took 25.3 s against 30.6 s. One betagal-like run on
an H200 ended one shell coarser (2026-12-05-h200-tf32-default.md), the scatter between fp32's own seeds 0 and 1 on that
set. On the CPU tf32 means fp32 (for_device): there is no TF32 there.

Only the coarse products Re⟨a, P⟩ and ⟨b, |P|²⟩ use these modes; diff2 is assembled from them in float32, and
the fine pass and everything else stay float32. The significant set then absorbs the coarse error: a test
bounds |Δdiff2| on the significant samples against float64 (tests/estep/test_precision.py).

- tf32: TensorFloat-32 tensor cores (10-bit mantissa operands, float32 accumulation), CUDA only. The local searches'
  fused kernel (fused_local.py) keeps its IEEE float32 products under it: that pass is bound by interpolating the
  candidates' slices, not by its products.
- fp16: each row of both operands is scaled by a power of two so its largest |value| lies in [0.5, 1) (no
  overflow, no loss to subnormals for the large terms), rounded to float16, multiplied with float32
  accumulation and float32 output (cuBLAS), then unscaled exactly. On the CPU the same numbers come from
  float32 products of the float16-rounded operands.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "tf32", "fp16")


@contextmanager
def tf32_matmul(enabled: bool):
    """TF32 in CUDA float32 matrix products on (``enabled``) or off inside the block; the setting is restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def for_device(precision: str, device) -> str:
    """The precision the coarse pass uses on ``device``: tf32 only on CUDA (TensorFloat-32 is a tensor-core format;
    the CPU's products, and its compiled local-search loop, are float32), the others as given."""
    return "fp32" if precision == "tf32" and torch.device(device).type != "cuda" else precision


def row_scaled_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., rows, k) float32 -> (x·2^-e as float16, e (..., rows) float32) with max_k |x·2^-e| in [0.5, 1)."""
    _, e = torch.frexp(x.abs().amax(-1))
    e = e.float()
    return (x * torch.exp2(-e)[..., None]).half(), e


def _half_product(a16: torch.Tensor, b16_t: torch.Tensor) -> torch.Tensor:
    """a16 (..., M, k) @ b16_t (..., k, N) with float32 accumulation and output."""
    if a16.is_cuda:
        mm = torch.mm if a16.dim() == 2 else torch.bmm
        return mm(a16, b16_t, out_dtype=torch.float32)
    return a16.float() @ b16_t.float()


def matmul_nt(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """a (..., M, k) · b (..., N, k)ᵀ -> (..., M, N) float32 (2-D, or 3-D batched), in the given precision."""
    if precision == "fp16":
        a16, ea = row_scaled_half(a)
        b16, eb = row_scaled_half(b)
        # unscale in place (powers of two: exact), no second (M, N) array
        return (
            _half_product(a16, b16.transpose(-1, -2))
            .mul_(torch.exp2(ea)[..., :, None])
            .mul_(torch.exp2(eb)[..., None, :])
        )
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    with tf32_matmul(precision == "tf32"):
        return a @ b.transpose(-1, -2)
