"""The E-step's settings and its per-particle results (a home of their own: every stage module reads them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EStepSettings:
    adaptive_fraction: float = 0.999
    maxsig: int = 0  # 0: no cap
    firstiter_cc: bool = False  # cross-correlation, best pose only
    # local searches (EStepPass.local): the Gaussian prior's σ of rot, tilt and psi (degrees; 0: that angle is not
    # restricted), or one σ for all three (PoseGrid.local_candidates)
    local_sigma_deg: float | tuple[float, float, float] = 0.0
    sigma2_offset_angst2: float = 100.0  # Gaussian prior on the absolute offset (centred on 0, or its STAR prior)
    angpix: float = 1.0
    direction_log_prior: torch.Tensor | None = (
        None  # (K, D) RELION's pdf_direction (joint with the class) in global searches
    )
    precision: str = "fp32"  # coarse-pass matrix products: fp32, tf32 or fp16 (precision.py)
    score_shell: int | None = (
        None  # --strict_highres_exp: pixels beyond this shell are stored but not scored (None: all)
    )


@dataclass
class BatchPoses:
    """Per-particle results: best pose and RELION's per-particle statistics."""

    class_index: torch.Tensor  # (n,)
    # (n, 2) the best sample's coarse rotation id and fine child (PoseGrid.best_eulers_deg); None: the particles keep
    # their angles (--skip_align, --skip_rotate). On the device: read with the other results, once per batch
    fine_pose: torch.Tensor | None
    offsets_px: torch.Tensor  # (n, 2) new absolute origin offsets
    max_prob: torch.Tensor  # (n,)
    n_significant: torch.Tensor  # (n,)
    loglik: torch.Tensor  # (n,)
    angular_spread_deg: torch.Tensor  # (n,) posterior RMS angle from the best rotation (expected angular error)
    offset_spread_px: torch.Tensor  # (n,) posterior RMS distance from the best offset
    residual_power: torch.Tensor | None = None  # (n,) Σ_j Σ Γ |X̃ − sCP|² over the window (for --norm)

    @classmethod
    def cat(cls, parts: list["BatchPoses"]) -> "BatchPoses":
        """The poses of consecutive tiles as one batch."""

        def join(name):
            values = [getattr(p, name) for p in parts]
            if values[0] is None:
                return None
            return torch.cat(values)

        return cls(**{name: join(name) for name in cls.__dataclass_fields__})
