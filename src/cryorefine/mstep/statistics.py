"""The noise and prior statistics of one model (RELION's MlModel parts the E-step reads): σ², the per-group intensity
scales and the offset prior's variance, with their M-step update.

In auto-refine each half set has its own (RELION combines the weighted sums of a half set's followers only), pooled
in the final iteration, when RELION joins the halves; classification has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estep.sums import WeightedSums
from .noise import update_sigma2


def _pooled(sums: list[WeightedSums], name: str) -> torch.Tensor:
    """The sum of one accumulator over ``sums``."""
    return torch.stack([getattr(s, name) for s in sums]).sum(0)


SCALE_BOUNDS = (0.2, 5.0)  # per-group intensity scales are kept within these (relative to their mean)


@dataclass(frozen=True)
class ModelStatistics:
    sigma2: torch.Tensor  # (G, d//2+1) float64 noise power per optics group and shell (our unnormalised DFT's units)
    scale: torch.Tensor  # (G,) float64 intensity scale per optics group (mean 1)
    sigma2_offset_angst2: float  # variance of the Gaussian prior on origin offsets (Å²)

    @classmethod
    def initial(cls, sigma2: torch.Tensor, sigma_offset_angst: float) -> "ModelStatistics":
        return cls(sigma2.cpu(), torch.ones(sigma2.shape[0], dtype=torch.float64), sigma_offset_angst**2)


def updated_statistics(
    old: ModelStatistics,
    sums: list[WeightedSums],
    min_sigma2_offset_angst2: float,
    noise: bool = True,
    scale: bool = False,
) -> ModelStatistics:
    """The M-step of ``old`` from the pooled ``sums`` (one half set's, or both in the final iteration): σ² (unless
    ``noise`` is False: RELION keeps it after a --firstiter_cc iteration), the group scales with ``scale`` (--scale,
    several groups), and the offset prior's variance (at least ``min_sigma2_offset_angst2``)."""
    sigma2, group_scale, sigma2_offset = old.sigma2, old.scale, old.sigma2_offset_angst2
    if noise:
        wsum = _pooled(sums, "sigma2_noise")
        sigma2 = update_sigma2(old.sigma2.to(wsum), wsum, _pooled(sums, "sigma2_count")).cpu()
    if scale and old.scale.numel() > 1:
        xa = _pooled(sums, "scale_xa").sum(1)
        aa = _pooled(sums, "scale_aa").sum(1)
        sc = (xa / aa.clamp(min=1e-30)).cpu()
        group_scale = (sc / sc.mean()).clamp(*SCALE_BOUNDS)
    off_w = float(_pooled(sums, "offset_weight"))
    if off_w > 0:
        sigma2_offset = max(float(_pooled(sums, "offset_sq_angst2")) / off_w, min_sigma2_offset_angst2)
    return ModelStatistics(sigma2, group_scale, sigma2_offset)
