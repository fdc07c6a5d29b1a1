"""The E-step on a batch of particles: the paper's four stages after getFourierTransformsAndCTFs, one module each:
getAllSquaredDifferences (diff2.py: coarse and fine scores, priors), convertAllSquaredDifferencesToWeights
(weights.py: posteriors and significant samples), the fine pass's slots (slots.py) and storeWeightedSums (store.py).

Significant coarse samples (smallest set holding ``adaptive_fraction`` of the posterior) are expanded to
8 rotations × 4 translations each for the fine pass at the full window.

A batch runs in tiles of particles sized to the device's free memory (memory.py); a tile that runs out of
memory anyway is halved and retried (tiling.py). Particles are independent, so the tiling does not change
the results beyond float32 summation order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..projection.extract import PaddedTransform, extract_central_slices
from ..tiling import run_tiles
from .diff2 import (
    coarse_gemm_flops,
    coarse_log_posterior,
    get_all_squared_differences_fine,
    score_weights,
    translation_log_prior,
)
from .images import ImageBatch, Window
from .memory import TileShape, fine_particles_per_chunk, particles_per_tile, tile_budget
from .poses import N_ROT_CHILDREN, N_TRANS_CHILDREN, PoseGrid
from .settings import BatchPoses, EStepSettings
from .slots import fine_slots, slot_groups
from .stages import NO_STAGES, Stages
from .store import FineChunk, add_power_beyond_window, store_weighted_sums
from .sums import TileSums, WeightedSums
from .weights import coarse_significant, convert_fine_to_weights, negligible_dropped


def expectation_batch(
    batch: ImageBatch,
    window: Window,
    coarse_shell: int,
    refs: list[PaddedTransform],
    poses: PoseGrid,
    settings: EStepSettings,
    sums: WeightedSums | None,
    local_prior=None,
    timer: Stages | None = None,
    forced_class: torch.Tensor | None = None,
    budget_bytes: int | None = None,
) -> BatchPoses:
    """One batch through the E-step; adds its weighted sums into ``sums`` (if given); returns best poses.

    ``forced_class`` (n,): hold each particle to one class (RELION's random class in the first iteration).
    ``budget_bytes``: device memory the E-step may allocate (default: memory.tile_budget now). The batch runs
    in tiles of particles predicted to fit it; a tile that runs out of memory is halved and retried, and its sums
    are added only once it has finished.
    """
    stage = timer if timer is not None else NO_STAGES
    budget = tile_budget(batch.f_masked.device) if budget_bytes is None else budget_bytes
    slots = poses.n_rotations if local_prior is None else local_prior[0].shape[1]
    shape = TileShape(
        len(refs),
        poses.n_translations,
        slots,
        poses.n_rotations,
        window.prefix(coarse_shell),
        window.size,
        local_prior is not None,
    )
    parts = []

    def compute(start: int, stop: int):
        rows = slice(start, stop)
        local = None if local_prior is None else tuple(x[rows] for x in local_prior)
        forced = None if forced_class is None else forced_class[rows]
        return _expectation_tile(
            batch.rows(rows), window, coarse_shell, refs, poses, settings, sums, local, stage, forced, budget
        )

    def commit(start: int, stop: int, result) -> None:
        tile_poses, tile_sums = result
        parts.append(tile_poses)
        if sums is not None:
            with stage("storeWeightedSums"):
                tile_sums.add_to(sums, window.ky, window.kx)

    run_tiles(len(batch), particles_per_tile(len(batch), budget, shape), compute, commit)
    if sums is not None and batch.spectrum_outside is not None:
        with stage("storeWeightedSums"):
            add_power_beyond_window(sums, batch, window)
    return BatchPoses.cat(parts)


def _expectation_tile(
    batch, window, coarse_shell, refs, poses, settings, sums, local_prior, stage: Stages, forced_class, budget
) -> tuple[BatchPoses, TileSums | None]:
    """One tile of particles through the E-step: best poses and the tile's weighted sums (not yet added to ``sums``).

    The fine pass works on the union U of the tile's significant coarse rotations: each particle is scored against
    the 8 fine rotations × 4 fine translations of its own significant coarse samples, by matrix products over its
    slots (padding and non-significant samples are masked out), in groups of particles with similar slot counts.
    storeWeightedSums is matrix products over the same grid (per-rotation sums of images, then one insertion per
    rotation, when the tile is committed).
    """
    dev = batch.f_masked.device
    n, K, T, J = len(batch), len(refs), poses.n_translations, window.size
    jc = window.prefix(coarse_shell)
    cc = settings.firstiter_cc

    with stage("getAllSquaredDifferences"):
        with stage.substage("coarse"):
            logp, rot_prior = coarse_log_posterior(batch, window, jc, refs, poses, settings, local_prior, forced_class)
        stage.add_flops("coarse", *coarse_gemm_flops(n, K, T, logp.shape[-1], jc, local_prior is not None))
    with stage("convertAllDiff2ToWeights"):
        mask, nsig = coarse_significant(logp, settings)
        del logp  # the coarse samples are not needed beyond their significance: free them for the fine pass
        fs = fine_slots(mask, rot_prior, local_prior, poses.n_rotations)
        del mask

    # the fine projections: of the union (over the tile) of significant (class, coarse rotation) pairs
    with stage("getAllSquaredDifferences"):
        G = len(fs.g_class)
        g_rot = poses.fine_rotations(fs.g_coarse)  # (G, 8, 3, 3)
        rot8_all = g_rot.reshape(-1, 3, 3)
        p_all = torch.empty(G * N_ROT_CHILDREN, J, dtype=batch.f_masked.dtype, device=dev)
        for k in range(K):
            sel = (fs.g_class == k).repeat_interleave(N_ROT_CHILDREN)
            if sel.any():
                p_all[sel] = extract_central_slices(refs[k], rot8_all[sel], window.ky, window.kx)
        w = score_weights(batch, window, cc)
        sc = batch.scale[:, None] * batch.ctf
        off_fine = (batch.old_offset_px[:, None, None, :] + poses.fine_translations()[None]).reshape(
            n, T * N_TRANS_CHILDREN, 2
        )
        # RELION's convertAllSquaredDifferencesToWeights takes the offset prior at the coarse translation for all its
        # fine children (the prior at each fine offset favours the children nearer the centre: other posteriors)
        t_prior = translation_log_prior(
            batch.old_offset_px[:, None, :] + poses.translations_px[None], settings
        ).repeat_interleave(N_TRANS_CHILDREN, 1)
        js = (
            J if settings.score_shell is None else window.prefix(settings.score_shell)
        )  # the pixels scored; all are stored
        const = (w[:, :js] * batch.f_masked[:, :js].abs() ** 2).sum(1).double()  # (n,)

    T4 = T * N_TRANS_CHILDREN
    Ls = fs.slot_g.shape[1]
    fine_particles_per_chunk(
        n, budget, G * N_ROT_CHILDREN, T4, Ls * N_ROT_CHILDREN, J
    )  # one particle of the most slots fits, or a clear stop
    child = torch.arange(N_ROT_CHILDREN, device=dev)
    out = {name: torch.zeros(n, device=dev) for name in ("max_prob", "ang_spread", "off_spread")}
    out.update(
        loglik=torch.zeros(n, dtype=torch.float64, device=dev),
        residual=torch.zeros(n, dtype=torch.float64, device=dev),
        best_off=torch.zeros(n, 2, device=dev),
        **{name: torch.zeros(n, dtype=torch.long, device=dev) for name in ("best_class", "best_coarse", "best_child")},
    )
    tile = None
    if sums is not None:
        tile = TileSums(
            sums.empty_stats(),
            rot8_all,
            fs.g_class.repeat_interleave(N_ROT_CHILDREN),
            torch.zeros(G * N_ROT_CHILDREN, J, dtype=batch.f_masked.dtype, device=dev),
            torch.zeros(G * N_ROT_CHILDREN, J, device=dev),
            torch.zeros(G * N_ROT_CHILDREN, device=dev),
        )
    for rows, Lc in slot_groups(
        fs.counts, lambda L: fine_particles_per_chunk(n, budget, G * N_ROT_CHILDREN, T4, min(L, Ls) * N_ROT_CHILDREN, J)
    ):
        m, L8 = len(rows), Lc * N_ROT_CHILDREN
        with stage("getAllSquaredDifferences"):
            rows8 = (fs.slot_g[rows, :Lc][:, :, None] * N_ROT_CHILDREN + child).reshape(m, L8)  # (m, 8L) rows of p_all
            pg = p_all[rows8]  # (m, 8L, J)
            p2 = pg.real**2 + pg.imag**2
            scores = get_all_squared_differences_fine(
                batch.f_masked[rows, :js], w[rows, :js], sc[rows, :js], window, off_fine[rows], pg, p2, cc
            )
            stage.add_flops(
                "fine", 2.0 * m * T4 * 2 * js * L8 + 2.0 * m * L8 * js
            )  # (m, T4, 2js) @ (m, 2js, 8L) and the |P|² term
            lg = -scores
            if not cc:
                lg = (
                    lg
                    + t_prior[rows][:, :, None]
                    + fs.slot_prior[rows, :Lc].repeat_interleave(N_ROT_CHILDREN, 1)[:, None, :]
                )
            ok = fs.allowed[rows, :, :Lc].repeat_interleave(N_TRANS_CHILDREN, 1).repeat_interleave(N_ROT_CHILDREN, 2)
            lg = torch.where(ok, lg, torch.full_like(lg, -torch.inf))
        with stage("convertAllDiff2ToWeights"):
            fw = convert_fine_to_weights(lg.reshape(m, -1), cc)
            _record_best(out, rows, fw, const, fs, rows8, rot8_all, off_fine, L8)
        if tile is not None:
            with stage("storeWeightedSums"):
                gam = fw.gamma if cc else negligible_dropped(fw.gamma, settings.adaptive_fraction)
                chunk = FineChunk(rows, rows8, off_fine[rows], gam.reshape(m, T4, L8), pg, p2)
                stage.add_flops("store", 8.0 * m * T4 * L8 * J)  # the four (m, 8L|T4, T4|8L) x (m, ., J) products
                out["residual"][rows] = store_weighted_sums(batch, window, chunk, fs, tile, settings, poses)
    eul = poses.fine_eulers_deg(out["best_coarse"].cpu().numpy())[np.arange(n), out["best_child"].cpu().numpy()]
    return BatchPoses(
        out["best_class"],
        eul,
        out["best_off"],
        out["max_prob"],
        nsig,
        out["loglik"],
        out["ang_spread"],
        out["off_spread"],
        out["residual"],
    ), tile


def _record_best(out: dict, rows, fw, const, fs, rows8, rot8_all, off_fine, L8: int) -> None:
    """Per particle of ``rows``: the best sample (class, coarse rotation, child, offset), RELION's max probability and
    log-likelihood, and the posterior's RMS angle and offset distance from the best sample (the expected errors)."""
    m = len(rows)
    dev = rows.device
    out["max_prob"][rows] = fw.max_prob.float()
    out["loglik"][rows] = fw.log_sum - const[rows]
    t4, r8 = fw.best // L8, fw.best % L8
    g_best = fs.slot_g[rows, r8 // N_ROT_CHILDREN]
    out["best_class"][rows] = fs.g_class[g_best]
    out["best_coarse"][rows] = fs.g_coarse[g_best]
    out["best_child"][rows] = r8 % N_ROT_CHILDREN
    out["best_off"][rows] = off_fine[rows][torch.arange(m, device=dev), t4]
    g3 = fw.gamma.reshape(m, -1, L8)
    r_best = rot8_all[rows8[torch.arange(m, device=dev), r8]]  # (m, 3, 3)
    cosang = ((torch.einsum("mij,mrij->mr", r_best, rot8_all[rows8]) - 1.0) / 2.0).clamp(-1.0, 1.0)
    out["ang_spread"][rows] = torch.sqrt((g3.sum(1) * torch.rad2deg(torch.acos(cosang)) ** 2).sum(1))
    doff = ((off_fine[rows] - out["best_off"][rows][:, None, :]) ** 2).sum(-1)  # (m, T4)
    out["off_spread"][rows] = torch.sqrt((g3.sum(2) * doff).sum(1))
