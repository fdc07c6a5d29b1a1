"""The E-step of RELION's --skip_align: each particle keeps its orientation and offset (from the STAR file, e.g. a
consensus refinement) and only its class is a hidden variable, as in a focused 3D classification.

Per particle and class k at its fixed pose R and offset: the projection P_k = reference_k sampled at Rᵀ·(M·k, 0),
diff2_k = Σ_j |X̃ − s·C·P_k|² / (2σ²) on the scored pixels, the posterior Γ_k ∝ p(k)·exp(−diff2_k). The sums are
RELION's for one sample per class: the back-projection of s·C·X̃/σ² with weight s²·C²/σ² at R (× Γ_k), σ², the
scale, the class weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ..projection.extract import PaddedTransform, extract_central_slices
from .diff2 import score_weights, translated
from .images import ImageBatch, Window
from .settings import BatchPoses
from .sums import WeightedSums


def expectation_fixed_poses(
    batch: ImageBatch,
    window: Window,
    refs: list[PaddedTransform],
    rotations: torch.Tensor,
    class_log_prior: torch.Tensor,
    sums: WeightedSums | None,
    angpix: float,
    forced_class: torch.Tensor | None = None,
) -> BatchPoses:
    """One batch: ``rotations`` (n, 3, 3) the particles' fixed poses (their offsets: ``batch.old_offset_px``),
    ``class_log_prior`` (K,); adds into ``sums``; returns each particle's class (``forced_class`` (n,) holds it)."""
    inside = window.in_circle(window.max_shell)
    xm = translated(batch.f_masked, window, batch.old_offset_px[:, None, :])[:, 0]  # (n, j)
    w = score_weights(batch, window, cc=False)
    sc = batch.scale[:, None] * batch.ctf * inside  # (n, j)
    rot = rotations.to(refs[0].f_padded.real.dtype)
    proj = torch.stack([extract_central_slices(r, rot, window.map_ky, window.map_kx) for r in refs], 1)  # (n, K, j)
    resid = xm[:, None, :] - sc[:, None, :] * proj
    diff2 = ((resid.abs() ** 2) * w[:, None, :]).sum(-1).double()  # (n, K)
    log_post = class_log_prior.to(diff2)[None, :] - diff2
    if forced_class is not None:
        log_post = torch.full_like(log_post, -torch.inf).scatter(1, forced_class[:, None].long(), 0.0)
    gamma = torch.softmax(log_post, 1)  # (n, K)
    best = gamma.argmax(1)
    n = len(batch)
    residual = ((resid.abs() ** 2).double() * window.scored.double() * gamma[..., None]).sum(1)  # (n, j)
    if sums is not None:
        _store(batch, window, xm, proj, gamma, residual, rot, sums, angpix)
    loglik = torch.logsumexp(log_post, 1)
    return BatchPoses(
        class_index=best,
        eulers_deg=np.full((n, 3), np.nan),  # the caller keeps the particles' own angles
        offsets_px=batch.old_offset_px.clone(),
        max_prob=gamma.max(1).values,
        n_significant=torch.ones(n, dtype=torch.int64, device=gamma.device),
        loglik=loglik,
        angular_spread_deg=torch.zeros(n, device=gamma.device),
        offset_spread_px=torch.zeros(n, device=gamma.device),
        residual_power=residual.sum(1),
    )


def _store(batch, window, xm, proj, gamma, residual, rot, sums: WeightedSums, angpix: float) -> None:
    """RELION's storeWeightedSums for one sample per class: back-projection, σ², scale and class weights."""
    inside = window.in_circle(window.max_shell)
    xu = translated(batch.f_unmasked, window, batch.old_offset_px[:, None, :])[:, 0]
    s, inv = batch.scale[:, None], batch.inv_sigma2
    bp_ctf = batch.ctf * inside if batch.bp_ctf is None else batch.bp_ctf * inside
    values, weights = xu * (s * bp_ctf * inv), s * s * batch.ctf * inside * bp_ctf * inv
    g = gamma.to(values.real.dtype)
    for k, bp in enumerate(sums.backprojectors):
        bp.insert(rot, window.map_ky, window.map_kx, values * g[:, k, None], weights * g[:, k, None])
    S = sums.sigma2_noise.shape[1]
    shell = window.shell.clamp(max=S - 1)
    flat = (batch.group[:, None] * S + shell[None, :]).reshape(-1)
    scored = window.scored.double()
    c = (batch.ctf * inside)[:, None, :]
    xa = (c * (xm[:, None, :] * proj.conj()).real).double() * scored * gamma[..., None]
    aa = ((c * proj).abs() ** 2).double() * scored * gamma[..., None]
    for target, value in (
        (sums.sigma2_noise, residual),
        (sums.sigma2_count, scored.expand_as(residual)),
        (sums.scale_xa, xa.sum(1)),
        (sums.scale_aa, aa.sum(1)),
    ):
        target.view(-1).index_add_(0, flat, value.reshape(-1))
    sums.class_weight += gamma.sum(0)
    sums.direction_weight[:, 0] += gamma.sum(0)  # one "direction" per class: the fixed poses have no others
    sums.offset_sq_angst2 += ((batch.old_offset_px.double() * angpix) ** 2).sum()
    sums.offset_weight += 2.0 * len(batch)
