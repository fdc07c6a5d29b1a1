"""RELION's per-particle normalisation correction (--norm, rlnNormCorrection): the image's residual noise std."""

from __future__ import annotations

import numpy as np


def updated_norm_corrections(
    old: np.ndarray, average: float, residual_power: np.ndarray, box: int | np.ndarray
) -> np.ndarray:
    """New rlnNormCorrection of particles (n,) from the last E-step, as RELION's storeWeightedSums / M-step:
    old / average · sqrt(2 · Σ residual power / d⁴), the residual noise std of the image as the E-step saw it (scaled by
    average / old), from its posterior-weighted residual power over every pixel (inside the window: Σ Γ |X̃ − sCP|²;
    beyond it: the image's own power; our unnormalised DFT's units, hence d⁴, each particle's ``box`` (n,) or one)."""
    return old / average * np.sqrt(np.maximum(2.0 * residual_power / np.asarray(box, dtype=np.float64) ** 4, 1e-12))
