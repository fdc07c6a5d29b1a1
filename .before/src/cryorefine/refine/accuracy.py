"""RELION's expected accuracy of the poses (calculateExpectedAngularErrors), which decides auto-refine's sampling.

For a sample of particles at their current poses: the angle by which one Euler angle (rot, tilt or psi, drawn at
random) must change, and the shift along x or y, before the projection's change outweighs the noise 100-fold in
likelihood, Σ_j |P(A) − P(A')|² C_j² / (2σ²_j) > ln 100 over the current window (DC left out). The perturbation is
walked on RELION's grid (0.05° steps below 0.2°, ..., 5° beyond 20°, up to 35°; shifts 0.1 px below 1 px, ..., up to
12 px) and the first step past the threshold counts; the averages over the sample are the accuracies.
Much coarser than the posterior's spread (a 100-fold likelihood drop, not one standard deviation).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..estep.images import Window
from ..geometry.euler import euler_to_matrix
from ..projection.extract import PaddedTransform, extract_central_slices

LOG_LIKELIHOOD_DROP = math.log(100.0)
N_TRIALS = 100  # RELION's n_trials_acc for 3D refinement of 2D images


def _walk(bounds: list[tuple[float, float]], last_step: float, limit: float) -> np.ndarray:
    """The perturbations RELION tries: from 0, add the step of the interval the value is in, until past ``limit``."""
    out, v = [], 0.0
    while v <= limit:
        v += next((step for bound, step in bounds if v < bound), last_step)
        out.append(v)
    return np.array(out)


ANGLE_STEPS_DEG = _walk([(0.2, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0), (20.0, 2.0)], 5.0, 30.0)
SHIFT_STEPS_PX = _walk([(1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0)], 2.0, 10.0)


def _first_past(snr: torch.Tensor, steps: np.ndarray) -> torch.Tensor:
    """(n, S) likelihood ratios over the walk -> (n,) the first step past the threshold (the last one if none is)."""
    past = snr > LOG_LIKELIHOOD_DROP
    idx = torch.where(
        past.any(1), past.float().argmax(1), torch.full_like(past[:, 0], len(steps) - 1, dtype=torch.long)
    )
    return torch.as_tensor(steps, dtype=torch.float64, device=snr.device)[idx]


def expected_accuracy(
    ref: PaddedTransform,
    eulers_deg: np.ndarray,
    ctf: torch.Tensor,
    inv_sigma2: torch.Tensor,
    window: Window,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """(rotations in degrees, translations in pixels) for particles at ``eulers_deg`` (n, 3) with their CTFs and 1/σ²
    (n, j) on the ``window``'s pixels, against the padded reference ``ref``."""
    dev = ctf.device
    n = len(eulers_deg)
    e0 = torch.as_tensor(np.asarray(eulers_deg, dtype=np.float64), device=dev)
    axis = torch.as_tensor(rng.integers(0, 3, n), device=dev)
    ang = torch.as_tensor(ANGLE_STEPS_DEG, device=dev)
    e = e0[:, None, :].repeat(1, len(ang), 1)
    e[torch.arange(n, device=dev), :, axis] += ang
    dtype = ref.f_padded.real.dtype
    r0 = euler_to_matrix(e0[:, 0], e0[:, 1], e0[:, 2]).to(dtype)
    r1 = euler_to_matrix(e[..., 0], e[..., 1], e[..., 2]).to(dtype)
    ky, kx = window.ky, window.kx
    p0 = extract_central_slices(ref, r0, ky, kx)  # (n, j)
    p1 = extract_central_slices(ref, r1, ky, kx)  # (n, A, j)
    w = (ctf**2 * inv_sigma2 * 0.5 * window.scored).to(torch.float64)  # (n, j); the window has no DC
    snr_rot = ((p1 - p0[:, None, :]).abs().to(torch.float64) ** 2 * w[:, None, :]).sum(-1)
    # a shift s along x or y multiplies P by exp(-2πi k s / d): |ΔP|² = |P|² · 2(1 − cos 2πks/d)
    k = torch.where(torch.as_tensor(rng.integers(0, 2, n), device=dev)[:, None] == 0, kx[None, :], ky[None, :]).to(
        torch.float64
    )
    sh = torch.as_tensor(SHIFT_STEPS_PX, device=dev)
    phase = 2.0 * math.pi * k[:, None, :] * sh[None, :, None] / window.box
    snr_trans = ((p0.abs().to(torch.float64) ** 2 * w)[:, None, :] * 2.0 * (1.0 - torch.cos(phase))).sum(-1)
    return float(_first_past(snr_rot, ANGLE_STEPS_DEG).mean()), float(_first_past(snr_trans, SHIFT_STEPS_PX).mean())
