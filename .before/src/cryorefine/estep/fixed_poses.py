"""The E-step of RELION's --skip_align and --skip_rotate: each particle keeps its orientation (from the STAR file, e.g.
a consensus refinement); --skip_align keeps its offset too, --skip_rotate searches the offsets about it. The class
(and the offset) are the hidden variables, as in a focused 3D classification.

Per particle, class k and offset t at its fixed rotation R: the projection P_k = reference_k sampled at Rᵀ·(M·k, 0),
diff2_kt = Σ_j |X̃_t − s·C·P_k|² / (2σ²) on the scored pixels, the posterior Γ_kt ∝ p(k)·p(t)·exp(−diff2_kt) (p(t):
the Gaussian offset prior, for a search only). The sums are RELION's for these samples: the back-projection of
Σ_t Γ_kt·s·C·X̃_t/σ² with weight Γ_k·s²·C²/σ² at R, σ², the scale, the class weights, the offset statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..projection.extract import PaddedTransform, extract_central_slices
from .diff2 import score_weights, translated, translation_log_prior
from .images import ImageBatch, Window
from .settings import BatchPoses, EStepSettings
from .sums import WeightedSums


def expectation_fixed_poses(
    batch: ImageBatch,
    window: Window,
    refs: Sequence[PaddedTransform],
    rotations: torch.Tensor,
    class_log_prior: torch.Tensor,
    sums: WeightedSums | None,
    settings: EStepSettings,
    translations_px: torch.Tensor | None = None,
    forced_class: torch.Tensor | None = None,
) -> BatchPoses:
    """One batch: ``rotations`` (n, 3, 3) the particles' fixed orientations, ``translations_px`` (T, 2) the offsets
    searched about each one's previous offset (None: that offset alone), ``class_log_prior`` (K,); adds into ``sums``;
    returns each particle's class and offset (``forced_class`` (n,) holds the class)."""
    dev = batch.f_masked.device
    t = torch.zeros(1, 2, device=dev) if translations_px is None else translations_px.to(dev, torch.float32)
    offsets = batch.old_offset_px[:, None, :] + t[None]  # (n, T, 2) absolute
    inside = window.in_circle(window.max_shell)
    xm = translated(batch.f_masked, window, batch.old_offset_px, t)  # (n, T, j)
    w = score_weights(batch, window, cc=False)
    sc = batch.scale[:, None] * batch.ctf * inside  # (n, j)
    rot = rotations.to(refs[0].f_padded.real.dtype)
    proj = torch.stack([extract_central_slices(r, rot, window.map_ky, window.map_kx) for r in refs], 1)  # (n, K, j)
    model = sc[:, None, :] * proj  # (n, K, j)
    first = ((xm[:, 0].abs() ** 2) * w).sum(-1).double()  # (n,): a shift does not change |X|
    cross = torch.einsum("ntj,nkj->nkt", xm * w[:, None, :], model.conj()).real.double()
    third = ((model.abs() ** 2) * w[:, None, :]).sum(-1).double()  # (n, K)
    diff2 = first[:, None, None] - 2.0 * cross + third[..., None]  # (n, K, T)
    log_post = class_log_prior.to(diff2)[None, :, None] - diff2
    if translations_px is not None:
        log_post = log_post + translation_log_prior(offsets, settings, batch.offset_prior_px).double()[:, None, :]
    if forced_class is not None:
        held = torch.full_like(log_post[..., 0], -torch.inf).scatter(1, forced_class[:, None].long(), 0.0)
        log_post = log_post + held[..., None]
    n, K, T = log_post.shape
    gamma = torch.softmax(log_post.reshape(n, -1), 1).reshape(n, K, T)
    best = gamma.reshape(n, -1).argmax(1)
    g = gamma.to(xm.real.dtype)
    x_bar = torch.einsum("nkt,ntj->nkj", g.to(xm.dtype), xm)  # Σ_t Γ_kt X̃_t
    g_class = g.sum(2)  # (n, K)
    scored = window.scored
    residual = ((xm[:, 0].abs() ** 2)[:, None, :] * g_class[..., None] + (model.abs() ** 2) * g_class[..., None]
                - 2.0 * (x_bar * model.conj()).real).sum(1).double() * scored.double()  # fmt: skip
    if sums is not None:
        _store(batch, window, t, offsets, proj, gamma, x_bar, residual, rot, sums, settings.angpix)
    return BatchPoses(
        class_index=best // T,
        fine_pose=None,  # the caller keeps the particles' own angles
        offsets_px=offsets[torch.arange(n, device=dev), best % T],
        max_prob=gamma.reshape(n, -1).max(1).values,
        n_significant=torch.ones(n, dtype=torch.int64, device=dev),
        loglik=torch.logsumexp(log_post.reshape(n, -1), 1),
        angular_spread_deg=torch.zeros(n, device=dev),
        offset_spread_px=torch.zeros(n, device=dev),
        residual_power=residual.sum(1),
    )


def _store(
    batch, window, grid_px, offsets, proj, gamma, x_bar, residual, rot, sums: WeightedSums, angpix: float
) -> None:
    """RELION's storeWeightedSums for these samples (the offsets ``grid_px`` (T, 2) about each particle's previous one,
    ``offsets`` (n, T, 2) the absolute ones): back-projection, σ², scale, class and offset weights."""
    inside = window.in_circle(window.max_shell)
    xu = translated(batch.f_unmasked, window, batch.old_offset_px, grid_px)  # (n, T, j)
    s, inv = batch.scale[:, None], batch.inv_sigma2
    bp_ctf = batch.ctf * inside if batch.bp_ctf is None else batch.bp_ctf * inside
    g = gamma.to(xu.real.dtype)
    g_class = g.sum(2)
    xu_bar = torch.einsum("nkt,ntj->nkj", g.to(xu.dtype), xu)
    weights = s * s * batch.ctf * inside * bp_ctf * inv  # (n, j)
    for k, bp in enumerate(sums.backprojectors):
        bp.insert(rot, window.map_ky, window.map_kx, xu_bar[:, k] * (s * bp_ctf * inv), weights * g_class[:, k, None])
    S = sums.sigma2_noise.shape[1]
    shell = window.shell.clamp(max=S - 1)
    flat = (batch.group[:, None] * S + shell[None, :]).reshape(-1)
    scored = window.scored.double()
    c = (batch.ctf * inside)[:, None, :]  # (n, 1, j)
    if sums.scale_shells is not None:  # each class's products only at its own shells (n, K, j)
        c = c * sums.scale_shells.take[:, window.map_shell.clamp(max=sums.scale_shells.take.shape[1] - 1)]
    xa = ((c * (x_bar * proj.conj()).real).double() * scored).sum(1)
    aa = ((c * proj).abs() ** 2).double().mul(g_class[..., None].double()).sum(1) * scored
    for target, value in ((sums.sigma2_noise, residual), (sums.sigma2_count, scored.expand_as(residual))):
        target.view(-1).index_add_(0, flat, value.reshape(-1))
    flat_m = (batch.scale_group[:, None] * S + shell[None, :]).reshape(-1)  # per micrograph group
    for target, value in ((sums.scale_xa, xa), (sums.scale_aa, aa)):
        target.view(-1).index_add_(0, flat_m, value.reshape(-1))
    sums.class_weight += g_class.double().sum(0)
    sums.direction_weight[:, 0] += g_class.double().sum(0)  # one "direction" per class: the fixed poses have no others
    per_t = gamma.sum(1).double()  # (n, T)
    from_centre = offsets if batch.offset_prior_px is None else offsets - batch.offset_prior_px[:, None, :]
    sums.offset_sq_angst2 += (per_t * ((from_centre.double() * angpix) ** 2).sum(-1)).sum()
    sums.offset_weight += 2.0 * per_t.sum()
