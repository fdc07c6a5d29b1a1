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

from collections.abc import Sequence

from dataclasses import dataclass

import torch

from ..projection.extract import PaddedTransform
from ..tiling import run_tiles
from .diff2 import (
    FinePassInputs,
    coarse_gemm_flops,
    coarse_log_posterior,
    fine_log_posterior,
    fine_pass_inputs,
    fine_projections,
    translated,
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
    refs: Sequence[PaddedTransform],
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
                tile_sums.add_to(sums, window.map_ky, window.map_kx)

    run_tiles(len(batch), particles_per_tile(len(batch), budget, shape), compute, commit)
    if sums is not None and batch.spectrum_outside is not None:
        with stage("storeWeightedSums"):
            add_power_beyond_window(sums, batch, window)
    return BatchPoses.cat(parts)


@dataclass
class _TileResults:
    """Per-particle results of a tile, filled group by group of the fine pass."""

    max_prob: torch.Tensor
    loglik: torch.Tensor
    best_class: torch.Tensor
    best_coarse: torch.Tensor
    best_child: torch.Tensor
    best_off: torch.Tensor
    ang_spread: torch.Tensor
    off_spread: torch.Tensor
    residual: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device) -> "_TileResults":
        f32, f64, i64 = ({"dtype": t, "device": device} for t in (torch.float32, torch.float64, torch.long))
        return cls(
            torch.zeros(n, **f32),
            torch.zeros(n, **f64),
            torch.zeros(n, **i64),
            torch.zeros(n, **i64),
            torch.zeros(n, **i64),
            torch.zeros(n, 2, **f32),
            torch.zeros(n, **f32),
            torch.zeros(n, **f32),
            torch.zeros(n, **f64),
        )

    def record(self, rows, fw, fine: FinePassInputs, slots, rows8, rotations, L8: int) -> None:
        """The best sample (class, coarse rotation, child, offset), RELION's max probability and log-likelihood, and
        the posterior's RMS angle and offset distance from the best sample (the expected errors) of ``rows``."""
        m = len(rows)
        at = torch.arange(m, device=rows.device)
        self.max_prob[rows] = fw.max_prob.float()
        self.loglik[rows] = fw.log_sum - fine.constant[rows]
        t4, r8 = fw.best // L8, fw.best % L8
        g_best = slots.slot_g[rows, r8 // N_ROT_CHILDREN]
        self.best_class[rows], self.best_coarse[rows] = slots.g_class[g_best], slots.g_coarse[g_best]
        self.best_child[rows] = r8 % N_ROT_CHILDREN
        offsets = fine.offsets_px[rows]
        self.best_off[rows] = offsets[at, t4]
        g3 = fw.gamma.reshape(m, -1, L8)
        cosang = ((torch.einsum("mij,mrij->mr", rotations[rows8[at, r8]], rotations[rows8]) - 1.0) / 2.0).clamp(
            -1.0, 1.0
        )
        self.ang_spread[rows] = torch.sqrt((g3.sum(1) * torch.rad2deg(torch.acos(cosang)) ** 2).sum(1))
        doff = ((offsets - self.best_off[rows][:, None, :]) ** 2).sum(-1)  # (m, T4)
        self.off_spread[rows] = torch.sqrt((g3.sum(2) * doff).sum(1))

    def batch_poses(self, n_significant: torch.Tensor) -> BatchPoses:
        return BatchPoses(
            self.best_class,
            torch.stack([self.best_coarse, self.best_child], 1),
            self.best_off,
            self.max_prob,
            n_significant,
            self.loglik,
            self.ang_spread,
            self.off_spread,
            self.residual,
        )


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
    n, T, J, cc = len(batch), poses.n_translations, window.size, settings.firstiter_cc
    jc = window.prefix(coarse_shell)
    with stage("getAllSquaredDifferences"):
        with stage.substage("coarse"):
            logp, rot_prior, blocks = coarse_log_posterior(
                batch, window, jc, refs, poses, settings, local_prior, forced_class
            )
        stage.add_flops(
            "coarse",
            *coarse_gemm_flops(n, len(refs), T, logp.shape[-1], jc, local_prior is not None, logp.is_cuda),
        )
    with stage("convertAllDiff2ToWeights"):
        stage.add_bytes("weights", logp.nbytes)  # the coarse scores, read at least once
        mask, nsig, total = coarse_significant(logp, settings, blocks)
        del logp  # the coarse samples are not needed beyond their significance: free them for the fine pass
        slots = fine_slots(mask, total, rot_prior, local_prior, poses.n_rotations)
        del mask
    with stage("getAllSquaredDifferences"):
        rotations, proj = fine_projections(refs, poses, slots, window, batch.f_masked.dtype)
        fine = fine_pass_inputs(batch, window, poses, settings)
    G8, T4, Ls8 = len(rotations), T * N_TRANS_CHILDREN, slots.slot_g.shape[1] * N_ROT_CHILDREN
    fine_particles_per_chunk(n, budget, G8, T4, Ls8, J)  # one particle of the most slots fits, or a clear stop
    results = _TileResults.zeros(n, batch.f_masked.device)
    tile = (
        None
        if sums is None
        else TileSums.zeros(sums, rotations, slots.g_class.repeat_interleave(N_ROT_CHILDREN), J, proj.dtype)
    )
    groups = slot_groups(slots, lambda L: fine_particles_per_chunk(n, budget, G8, T4, min(L * N_ROT_CHILDREN, Ls8), J))
    for rows, n_slots in groups:
        m, L8 = len(rows), n_slots * N_ROT_CHILDREN
        with stage("getAllSquaredDifferences"):
            moved = translated(batch.f_masked[rows], window, batch.old_offset_px[rows], fine.grid_px)  # (m, T4, J)
            lg, rows8, pg, p2 = fine_log_posterior(moved, fine, slots, rows, n_slots, proj, cc)
            stage.add_flops("fine", 2.0 * m * T4 * 2 * fine.scored * L8 + 2.0 * m * L8 * fine.scored)
        with stage("convertAllDiff2ToWeights"):
            stage.add_bytes("weights", 2 * lg.nbytes)  # the fine scores read, the weights written
            fw = convert_fine_to_weights(lg.reshape(m, -1), cc)
            results.record(rows, fw, fine, slots, rows8, rotations, L8)
        if tile is not None:
            with stage("storeWeightedSums"):
                gam = fw.gamma if cc else negligible_dropped(fw.gamma, settings.adaptive_fraction)
                chunk = FineChunk(
                    rows, rows8, fine.offsets_px[rows], fine.grid_px, moved, gam.reshape(m, T4, L8), pg, p2
                )
                stage.add_flops("store", 8.0 * m * T4 * L8 * J)  # the four (m, 8L|T4, T4|8L) x (m, ., J) products
                results.residual[rows] = store_weighted_sums(batch, window, chunk, slots, tile, settings, poses)
    return results.batch_poses(nsig), tile
