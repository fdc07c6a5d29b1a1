"""The E-step on a batch of particles: the paper's four stages after getFourierTransformsAndCTFs.

diff2(i, k, r, t) = Σ_j |X̃_ij(t) − s C_ij P_krj|² / (2σ²_j), expanded as
const_i − 2 Re⟨a_i(t), P_kr⟩ + ⟨b_i, |P_kr|²⟩ with a = s C X̃ / (2σ²), b = s² C² / (2σ²), so the coarse
pass is matrix products (shared rotations: one GEMM; local searches: one batched GEMM per particle).
Significant coarse samples (smallest set holding ``adaptive_fraction`` of the posterior) are expanded to
8 rotations × 4 translations each for the fine pass at the full window.

A batch runs in tiles of particles sized to the device's free memory (memory.py); a tile that runs out of
memory anyway is halved and retried (tiling.py). Particles are independent, so the tiling does not change
the results beyond float32 summation order.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..fourier.shift import phase_shift_factors
from ..projection.extract import PaddedTransform, extract_central_slices, extract_central_slices_planar
from ..tiling import run_tiles
from . import fused_local
from .images import ImageBatch, Window
from .memory import LOCAL_GATHER_ELEMENTS, TileShape, fine_particles_per_chunk, particles_per_tile, tile_budget
from .poses import N_ROT_CHILDREN, N_TRANS_CHILDREN, PoseGrid
from .precision import matmul_nt
from .sums import TileSums, WeightedSums


@dataclass
class EStepSettings:
    adaptive_fraction: float = 0.999
    maxsig: int = 0  # 0: no cap
    firstiter_cc: bool = False  # cross-correlation, best pose only
    local_sigma_deg: float = 0.0  # > 0: local angular searches with this Gaussian prior
    sigma2_offset_angst2: float = 100.0  # Gaussian prior on the absolute offset (centred on 0)
    angpix: float = 1.0
    direction_log_prior: torch.Tensor | None = None  # (K, D) RELION's pdf_direction (joint with the class) in global searches
    precision: str = "fp32"  # coarse-pass matrix products: fp32, tf32 or fp16 (precision.py)
    score_shell: int | None = None  # --strict_highres_exp: pixels beyond this shell are stored but not scored (None: all)


@dataclass
class BatchPoses:
    """Per-particle results: best pose and RELION's per-particle statistics."""

    class_index: torch.Tensor  # (n,)
    eulers_deg: np.ndarray  # (n, 3)
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
            return np.concatenate(values) if isinstance(values[0], np.ndarray) else torch.cat(values)

        return cls(**{name: join(name) for name in cls.__dataclass_fields__})


def _as_real(z: torch.Tensor) -> torch.Tensor:
    """(..., j) complex -> (..., 2j) real [Re, Im]."""
    return torch.cat([z.real, z.imag], -1)


def _translated(x: torch.Tensor, window: Window, offsets_px: torch.Tensor) -> torch.Tensor:
    """X̃ = X moved by offsets (..., 2) px: (n, j) with offsets (n, ..., 2) -> (n, ..., j)."""
    ph = phase_shift_factors(window.ky[: x.shape[-1]], window.kx[: x.shape[-1]], offsets_px, window.box)
    shape = (x.shape[0],) + (1,) * (offsets_px.dim() - 2) + (x.shape[-1],)
    return x.reshape(shape) * ph


def score_weights(batch: ImageBatch, window: Window, cc: bool) -> torch.Tensor:
    """(n, j) weight of each pixel in the scores: 1/(2σ²) for diff2; 1 for RELION's --firstiter_cc cross-correlation
    −Σ Re(X·conj(CP)) / √Σ|CP|², which is not noise-whitened (the image's own norm, a constant per particle, is left out:
    it does not change which pose is best). 0 on the redundant half of the kx = 0 column (Window.scored)."""
    return (torch.ones_like(batch.inv_sigma2) if cc else batch.inv_sigma2 * 0.5) * window.scored


def get_all_squared_differences_coarse(batch: ImageBatch, window: Window, jc: int, refs: list[PaddedTransform], poses: PoseGrid, local=None, cc=False,
                                       precision: str = "fp32"):
    """Coarse pass: diff2 without the per-particle constant, (n, K, T, L).

    ``local`` = (ids (n, L), log_prior, valid) for per-particle rotation sets; else all R coarse rotations.
    With ``cc`` the score is −CC (RELION's --firstiter_cc cross-correlation, score_weights).
    ``precision``: of the two matrix products (precision.py); diff2 is assembled from them in float32.
    """
    ky, kx = window.ky[:jc], window.kx[:jc]
    w = score_weights(batch, window, cc)[:, :jc]
    sc = batch.scale[:, None] * batch.ctf[:, :jc]
    xt = _translated(batch.f_masked[:, :jc], window, batch.old_offset_px[:, None, :] + poses.translations_px[None])  # (n, T, jc)
    a = _as_real(xt * (w * sc)[:, None, :])  # (n, T, 2jc)
    b = w * sc * sc  # (n, jc)
    n, T = a.shape[:2]
    out = []
    for k, ref in enumerate(refs):
        if local is None:
            p = poses.coarse_projections(refs, k, ky, kx)  # (R, 2, jc)
            cross = matmul_nt(a.reshape(n * T, -1), p.reshape(p.shape[0], -1), precision).reshape(n, T, -1)
            third = matmul_nt(b, p.square().sum(1), precision)  # (n, R)
        else:
            uniq, inv = torch.unique(local[0], return_inverse=True)  # (U,), (n, L) rows of the distinct rotations
            scores = fused_local.local_scores if fused_local.available(a, precision) else _local_scores_gathered
            cross, third = scores(ref, poses.rotations(uniq), inv, ky, kx, a, b, precision=precision)
        if cc:
            out.append(-cross / torch.sqrt(third.clamp(min=1e-30))[:, None, :])
        else:
            out.append(third[:, None, :] - 2.0 * cross)
    return torch.stack(out, 1)


def _local_scores_gathered(transform, rotations, idx, ky, kx, a, b, precision="fp32"):
    """fused_local.local_scores's results by PyTorch operations (the CPU's path, and other precisions): each distinct
    rotation's slice extracted once, gathered per particle in blocks and multiplied."""
    pu = extract_central_slices_planar(transform, rotations, ky, kx)  # (U, 2, jc)
    # the real operand [Re | Im] (a view) and |P|² once per distinct rotation, not per (particle, candidate):
    # the gathers below are then plain row copies
    pu_real, pu_pow = pu.reshape(pu.shape[0], -1), pu.square().sum(1)  # (U, 2jc), (U, jc)
    del pu
    (n, T, _), L, jc = a.shape, idx.shape[1], ky.numel()
    cross = a.new_empty(n, T, L)
    third = a.new_empty(n, L)
    step = max(1, LOCAL_GATHER_ELEMENTS // max(1, L * jc))  # particles per gathered (m, L, jc) block
    for c0 in range(0, n, step):
        sel = idx[c0 : c0 + step]  # (m, L)
        cross[c0 : c0 + step] = matmul_nt(a[c0 : c0 + step], pu_real[sel], precision)  # (m, T, L)
        third[c0 : c0 + step] = matmul_nt(b[c0 : c0 + step, None, :], pu_pow[sel], precision)[:, 0]
    return cross, third


def coarse_gemm_flops(n: int, K: int, T: int, L: int, jc: int, local: bool) -> tuple[float, list]:
    """Floating-point operations of the coarse pass's matrix products and their shapes, for n particles.

    Per reference: the cross term (n·T, 2jc) @ (2jc, L) and the |P|² term (n, jc) @ (jc, L) (global search, one
    GEMM each), or per particle (T, 2jc) @ (2jc, L) and (1, jc) @ (jc, L) (local searches, batched). 2·M·K·N each.
    Returns (flops, [(shape key, calls)]) with keys 'mm:MxKxN' or 'bmm:BxMxKxN'.
    """
    flops = K * (2.0 * n * T * 2 * jc * L + 2.0 * n * jc * L)
    if local:
        shapes = [(f"bmm:{n}x{T}x{2 * jc}x{L}", K), (f"bmm:{n}x1x{jc}x{L}", K)]
    else:
        shapes = [(f"mm:{n * T}x{2 * jc}x{L}", K), (f"mm:{n}x{jc}x{L}", K)]
    return flops, shapes


def translation_log_prior(offsets_abs_px: torch.Tensor, settings: EStepSettings) -> torch.Tensor:
    d2 = (offsets_abs_px**2).sum(-1) * settings.angpix**2
    return -d2 / (2.0 * settings.sigma2_offset_angst2)


TOPK_SIGNIFICANT = 256  # samples ranked per particle before falling back to a full sort


def significant_mask(logits: torch.Tensor, fraction: float, maxsig: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per particle (rows of (n, S) logits): the smallest set holding ``fraction`` of the posterior mass.

    Returns (mask (n, S), count (n,)). Sort + cumulative sum, as RELION's adaptive oversampling.
    """
    return significant_set(torch.softmax(logits, dim=1), fraction, maxsig)


def significant_set(p: torch.Tensor, fraction: float, maxsig: int) -> tuple[torch.Tensor, torch.Tensor]:
    """significant_mask of rows that are already probabilities (n, S)."""
    S = p.shape[1]
    # The mass is almost always in a few samples: rank the largest TOPK_SIGNIFICANT first (top-k, far cheaper than
    # sorting 10^5-10^6 samples per particle) and sort in full only the rows whose fraction lies beyond them: the
    # same leading values in the same order, so the same set as a full sort (up to rounding in the cumulative sum).
    k = min(S, max(TOPK_SIGNIFICANT, maxsig))
    sp = torch.topk(p, k, dim=1).values if k < S else torch.sort(p, dim=1, descending=True).values
    count = (torch.cumsum(sp, dim=1) < fraction).sum(1) + 1
    if maxsig > 0:
        count = count.clamp(max=maxsig)
    thresh = sp.gather(1, (count.clamp(max=k) - 1)[:, None])
    rows = (count > k).nonzero()[:, 0]  # the fraction lies beyond the top k (never with --maxsig <= k)
    if len(rows):
        full = torch.sort(p[rows], dim=1, descending=True).values
        count[rows] = ((torch.cumsum(full, dim=1) < fraction).sum(1) + 1).clamp(max=S)
        thresh[rows] = full.gather(1, (count[rows] - 1)[:, None])
    count = count.clamp(max=S)
    mask = p >= thresh
    return mask, count


def expectation_batch(
    batch: ImageBatch,
    window: Window,
    coarse_shell: int,
    refs: list[PaddedTransform],
    poses: PoseGrid,
    settings: EStepSettings,
    sums: WeightedSums | None,
    local_prior=None,
    timer=None,
    forced_class: torch.Tensor | None = None,
    budget_bytes: int | None = None,
) -> BatchPoses:
    """One batch through the E-step; adds its weighted sums into ``sums`` (if given); returns best poses.

    ``forced_class`` (n,): hold each particle to one class (RELION's random class in the first iteration).
    ``budget_bytes``: device memory the E-step may allocate (default: memory.tile_budget now). The batch runs
    in tiles of particles predicted to fit it; a tile that runs out of memory is halved and retried, and its sums
    are added only once it has finished.
    """
    stage = timer or (lambda name: nullcontext())
    budget = tile_budget(batch.f_masked.device) if budget_bytes is None else budget_bytes
    slots = poses.n_rotations if local_prior is None else local_prior[0].shape[1]
    shape = TileShape(len(refs), poses.n_translations, slots, poses.n_rotations, window.prefix(coarse_shell), window.size, local_prior is not None)
    parts = []

    def compute(start: int, stop: int):
        rows = slice(start, stop)
        local = None if local_prior is None else tuple(x[rows] for x in local_prior)
        forced = None if forced_class is None else forced_class[rows]
        return _expectation_tile(batch.rows(rows), window, coarse_shell, refs, poses, settings, sums, local, stage, forced, budget)

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


def add_power_beyond_window(sums: WeightedSums, batch: ImageBatch, window: Window) -> None:
    """RELION's storeWeightedSums beyond the window: each image's own power spectrum enters σ² (weight 1 per particle,
    the posterior's total) at the shells up to Nyquist that the window left out, so σ² follows the data at every shell,
    not only inside the windows seen so far."""
    spectrum = batch.spectrum_outside  # (n, S), zero inside the window
    npix = window.beyond()[2]
    sums.sigma2_noise.index_add_(0, batch.group, spectrum)
    sums.sigma2_count.index_add_(0, batch.group, npix.expand_as(spectrum).contiguous())


def _coarse_log_posterior(batch, window, jc, refs, poses, settings, local_prior, forced_class):
    """The coarse pass as log-posteriors (n, K, T, L) (−diff2 + priors; −CC with --firstiter_cc) and the rotation log prior (n, K, L)."""
    dev = batch.f_masked.device
    n, K = len(batch), len(refs)
    cc = settings.firstiter_cc
    logp = -get_all_squared_differences_coarse(batch, window, jc, refs, poses, local_prior, cc=cc, precision=settings.precision)
    L = logp.shape[-1]
    rot_prior = torch.zeros(n, K, L, device=dev)  # log prior of each coarse rotation slot
    if not cc:
        if local_prior is not None:
            rot_prior = rot_prior + torch.where(local_prior[2], local_prior[1], torch.full_like(local_prior[1], -torch.inf))[:, None, :]
        elif settings.direction_log_prior is not None:
            dir_of_rot = torch.arange(L, device=dev) // poses.sampling.n_psi
            rot_prior = rot_prior + settings.direction_log_prior.to(dev).float()[:, dir_of_rot][None]
        trans_prior = translation_log_prior(batch.old_offset_px[:, None, :] + poses.translations_px[None], settings)  # (n, T)
        logp = logp + trans_prior[:, None, :, None] + rot_prior[:, :, None, :]
    elif local_prior is not None:
        logp = torch.where(local_prior[2][:, None, None, :], logp, torch.full_like(logp, -torch.inf))
    if forced_class is not None:
        held = torch.arange(K, device=dev)[None, :] == forced_class.to(dev)[:, None]  # (n, K)
        logp = torch.where(held[:, :, None, None], logp, torch.full_like(logp, -torch.inf))
    return logp, rot_prior


def _coarse_significant(logp: torch.Tensor, settings: EStepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Significant coarse samples: mask (n, K, T, L) and count (n,); the best one only with --firstiter_cc."""
    n = logp.shape[0]
    flat = logp.reshape(n, -1)
    if settings.firstiter_cc:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.arange(n, device=flat.device), flat.argmax(1)] = True
        return mask.reshape(logp.shape), torch.ones(n, dtype=torch.long, device=flat.device)
    mask, nsig = significant_mask(flat, settings.adaptive_fraction, settings.maxsig)
    return mask.reshape(logp.shape), nsig


@dataclass
class FineSlots:
    """The fine pass's rotations: the union G of the tile's significant (class, coarse rotation) pairs, and each
    particle's own pairs as slots into it, padded to the largest count Ls."""

    g_class: torch.Tensor  # (G,)
    g_coarse: torch.Tensor  # (G,) coarse rotation ids
    slot_g: torch.Tensor  # (n, Ls) index into G (padding: 0)
    slot_prior: torch.Tensor  # (n, Ls) log prior of the slot's coarse rotation (padding: −inf)
    allowed: torch.Tensor  # (n, T, Ls) bool: (coarse translation, slot) was significant
    counts: torch.Tensor  # (n,) slots in use per particle (the first counts[i] of its row)


def _fine_slots(mask: torch.Tensor, rot_prior: torch.Tensor, local_prior, n_rotations: int) -> FineSlots:
    """From the significant mask (n, K, T, L) and the rotation log prior (n, K, L) to the fine pass's slots."""
    n, _, T, _ = mask.shape
    dev = mask.device
    i_idx, k_idx, t_idx, l_idx = torch.nonzero(mask).unbind(1)  # significant: particle, class, translation, rotation slot
    coarse_id = l_idx if local_prior is None else local_prior[0][i_idx, l_idx]
    R = n_rotations
    gkeys, g_of_sig = torch.unique(k_idx * R + coarse_id, return_inverse=True)  # union G; g_of_sig (M,)
    G = len(gkeys)
    pk, pk_inv = torch.unique(i_idx * G + g_of_sig, return_inverse=True)
    p_part, p_g = pk // G, pk % G
    counts = torch.bincount(p_part, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(pk), device=dev) - starts[p_part]
    Ls = int(counts.max())
    slot_g = torch.zeros(n, Ls, dtype=torch.long, device=dev)
    slot_g[p_part, slot] = p_g
    slot_prior = torch.full((n, Ls), -torch.inf, device=dev)
    slot_prior[i_idx, slot[pk_inv]] = rot_prior[i_idx, k_idx, l_idx]
    allowed = torch.zeros(n, T, Ls, dtype=torch.bool, device=dev)
    allowed[i_idx, t_idx, slot[pk_inv]] = True
    return FineSlots(gkeys // R, gkeys % R, slot_g, slot_prior, allowed, counts)


def _slot_groups(counts: torch.Tensor, rows_for) -> list[tuple[torch.Tensor, int]]:
    """The fine pass's particle groups: (rows, slots), particles ordered by their slot count, a group's largest count
    at most twice its smallest (or 4), and at most rows_for(that limit) rows (the memory budget), so that padding to
    the group's largest count wastes little. (Padded to the tile's largest count, a few particles with broad
    posteriors made every particle's products and accumulations several times larger.)"""
    order = torch.argsort(counts)
    sorted_counts = counts[order].cpu().numpy()
    groups, g0, n = [], 0, len(sorted_counts)
    while g0 < n:
        limit = max(4, 2 * int(sorted_counts[g0]))
        g1 = min(int(np.searchsorted(sorted_counts, limit, side="right")), g0 + rows_for(limit), n)
        g1 = max(g1, g0 + 1)
        groups.append((order[g0:g1], max(1, int(sorted_counts[g1 - 1]))))
        g0 = g1
    return groups


def _expectation_tile(batch, window, coarse_shell, refs, poses, settings, sums, local_prior, stage, forced_class, budget) -> tuple[BatchPoses, TileSums]:
    """One tile of particles through the E-step: best poses and the tile's weighted sums (not yet added to ``sums``).

    The fine pass works on the union U of the tile's significant coarse rotations: each particle is scored against
    the 8 fine rotations × 4 fine translations of its own significant coarse samples, by matrix products over its
    slots (padding and non-significant samples are masked out). storeWeightedSums is matrix products over the same
    grid (per-rotation sums of images, then one insertion per rotation, when the tile is committed).
    """
    dev = batch.f_masked.device
    n, K = len(batch), len(refs)
    jc = window.prefix(coarse_shell)
    T = poses.n_translations
    cc = settings.firstiter_cc

    # ---- getAllSquaredDifferences, pass 0 (coarse)
    with stage("getAllSquaredDifferences"):
        with (stage.substage("coarse") if hasattr(stage, "substage") else nullcontext()):
            logp, rot_prior = _coarse_log_posterior(batch, window, jc, refs, poses, settings, local_prior, forced_class)
        if hasattr(stage, "add_flops"):
            stage.add_flops("coarse", *coarse_gemm_flops(n, K, T, logp.shape[-1], jc, local_prior is not None))

    # ---- convertAllSquaredDifferencesToWeights, pass 0: significant coarse samples
    with stage("convertAllDiff2ToWeights"):
        mask, nsig = _coarse_significant(logp, settings)
        del logp  # the coarse samples are not needed beyond their significance: free them for the fine pass
        fs = _fine_slots(mask, rot_prior, local_prior, poses.n_rotations)
        del mask

    # ---- fine projections: the union (over the tile) of significant (class, coarse rotation) pairs
    with stage("getAllSquaredDifferences"):
        J = window.size
        G = len(fs.g_class)
        g_rot = poses.fine_rotations(fs.g_coarse)  # (G, 8, 3, 3)
        p_all = torch.empty(G * N_ROT_CHILDREN, J, dtype=batch.f_masked.dtype, device=dev)
        for k in range(K):
            sel = (fs.g_class == k).repeat_interleave(N_ROT_CHILDREN)
            if sel.any():
                p_all[sel] = extract_central_slices(refs[k], g_rot.reshape(-1, 3, 3)[sel], window.ky, window.kx)
        slot_g, slot_prior, allowed = fs.slot_g, fs.slot_prior, fs.allowed
        Ls = slot_g.shape[1]
        w = score_weights(batch, window, cc)
        sc = batch.scale[:, None] * batch.ctf
        off_fine = (batch.old_offset_px[:, None, None, :] + poses.fine_translations()[None]).reshape(n, T * N_TRANS_CHILDREN, 2)
        # RELION's convertAllSquaredDifferencesToWeights takes the offset prior at the coarse translation for all its
        # fine children (the prior at each fine offset favours the children nearer the centre: other posteriors)
        t_prior = (translation_log_prior(batch.old_offset_px[:, None, :] + poses.translations_px[None], settings).repeat_interleave(N_TRANS_CHILDREN, 1)
                   if not cc else torch.zeros(n, T * N_TRANS_CHILDREN, device=dev))
        js = J if settings.score_shell is None else window.prefix(settings.score_shell)  # the pixels scored; all are stored
        const = (w[:, :js] * batch.f_masked[:, :js].abs() ** 2).sum(1).double()  # (n,)

    T4 = T * N_TRANS_CHILDREN
    fine_particles_per_chunk(n, budget, G * N_ROT_CHILDREN, T4, Ls * N_ROT_CHILDREN, J)  # one particle of the most slots fits, or a clear stop
    child = torch.arange(N_ROT_CHILDREN, device=dev)
    best_class = torch.zeros(n, dtype=torch.long, device=dev)
    best_coarse = torch.zeros(n, dtype=torch.long, device=dev)
    best_child = torch.zeros(n, dtype=torch.long, device=dev)
    best_off = torch.zeros(n, 2, device=dev)
    max_prob = torch.zeros(n, device=dev)
    loglik = torch.zeros(n, dtype=torch.float64, device=dev)
    ang_spread = torch.zeros(n, device=dev)
    residual = torch.zeros(n, dtype=torch.float64, device=dev)
    off_spread = torch.zeros(n, device=dev)
    rot8_all = g_rot.reshape(-1, 3, 3)
    stats = sums.empty_stats() if sums is not None else None  # the tile's own accumulators, added when it has finished
    acc_v = torch.zeros(G * N_ROT_CHILDREN, J, dtype=batch.f_masked.dtype, device=dev) if sums is not None else None
    acc_w = torch.zeros(G * N_ROT_CHILDREN, J, device=dev) if sums is not None else None
    acc_mass = torch.zeros(G * N_ROT_CHILDREN, device=dev) if sums is not None else None
    for rows, Lc in _slot_groups(fs.counts, lambda L: fine_particles_per_chunk(n, budget, G * N_ROT_CHILDREN, T4, min(L, Ls) * N_ROT_CHILDREN, J)):
        m, L8 = len(rows), Lc * N_ROT_CHILDREN
        with stage("getAllSquaredDifferences"):
            rows8 = (slot_g[rows, :Lc][:, :, None] * N_ROT_CHILDREN + child).reshape(m, L8)  # (m, 8L) rows of p_all
            pg = p_all[rows8]  # (m, 8L, J)
            xt = _translated(batch.f_masked[rows, :js], window, off_fine[rows])  # (m, T4, js)
            a = _as_real(xt * (w[rows, :js] * sc[rows, :js])[:, None, :])
            cross = torch.bmm(a, _as_real(pg[..., :js]).transpose(1, 2))  # (m, T4, 8L)
            if hasattr(stage, "add_flops"):
                stage.add_flops("fine", 2.0 * m * T4 * 2 * js * L8 + 2.0 * m * L8 * js)  # (m, T4, 2js) @ (m, 2js, 8L) and the |P|² term
            p2 = pg.real**2 + pg.imag**2
            third = torch.einsum("mj,mrj->mr", (w[rows] * sc[rows] ** 2)[:, :js], p2[..., :js])  # (m, 8L)
            ok = allowed[rows, :, :Lc].repeat_interleave(N_TRANS_CHILDREN, 1).repeat_interleave(N_ROT_CHILDREN, 2)
            if cc:
                lg = cross / torch.sqrt(third.clamp(min=1e-30))[:, None, :]
            else:
                lg = 2.0 * cross - third[:, None, :] + t_prior[rows][:, :, None] + slot_prior[rows, :Lc].repeat_interleave(N_ROT_CHILDREN, 1)[:, None, :]
            lg = torch.where(ok, lg, torch.full_like(lg, -torch.inf))
        with stage("convertAllDiff2ToWeights"):
            flat_lg = lg.reshape(m, -1)
            mx, arg = flat_lg.max(1)
            if cc:
                gam = (flat_lg == mx[:, None]).float()
                gam = gam / gam.sum(1, keepdim=True)
                lse = mx.double()
                max_prob[rows] = 1.0
            else:
                lse = mx.double() + torch.log(torch.exp(flat_lg - mx[:, None]).sum(1).double())
                gam = torch.exp(flat_lg - lse[:, None].float())
                max_prob[rows] = torch.exp(mx.double() - lse).float()
            loglik[rows] = lse - const[rows]
            t4, r8 = arg // L8, arg % L8
            g_best = slot_g[rows, r8 // N_ROT_CHILDREN]
            best_class[rows] = fs.g_class[g_best]
            best_coarse[rows] = fs.g_coarse[g_best]
            best_child[rows] = r8 % N_ROT_CHILDREN
            best_off[rows] = off_fine[rows][torch.arange(m, device=dev), t4]
            # expected errors: posterior RMS angle and offset distance from the best sample
            g3 = gam.reshape(m, T4, L8)
            r_best = rot8_all[rows8[torch.arange(m, device=dev), r8]]  # (m, 3, 3)
            cosang = ((torch.einsum("mij,mrij->mr", r_best, rot8_all[rows8]) - 1.0) / 2.0).clamp(-1.0, 1.0)
            ang_spread[rows] = torch.sqrt((g3.sum(1) * torch.rad2deg(torch.acos(cosang)) ** 2).sum(1))
            doff = ((off_fine[rows] - best_off[rows][:, None, :]) ** 2).sum(-1)  # (m, T4)
            off_spread[rows] = torch.sqrt((g3.sum(2) * doff).sum(1))
        if sums is not None:
            with stage("storeWeightedSums"):
                if not cc:
                    gam = _negligible_dropped(gam, settings.adaptive_fraction)
                gam = gam.reshape(m, T4, L8)
                if hasattr(stage, "add_flops"):
                    stage.add_flops("store", 8.0 * m * T4 * L8 * J)  # the four (m, 8L|T4, T4|8L) x (m, ., J) products
                residual[rows] = _store_chunk(batch, window, rows, off_fine, gam, pg, p2, rows8, fs.g_class, fs.g_coarse, acc_v, acc_w, acc_mass, stats, settings, poses)
    tile_sums = None if sums is None else TileSums(stats, rot8_all, fs.g_class.repeat_interleave(N_ROT_CHILDREN), acc_v, acc_w, acc_mass)
    eul = poses.fine_eulers_deg(best_coarse.cpu().numpy())[np.arange(n), best_child.cpu().numpy()]
    return BatchPoses(best_class, eul, best_off, max_prob, nsig, loglik, ang_spread, off_spread, residual), tile_sums


NEGLIGIBLE_SAMPLE_WEIGHT = 1e-5  # posterior probability below which a fine sample outside RELION's significant set is dropped


def _negligible_dropped(gam: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fine posterior (m, S) without the samples RELION's storeWeightedSums skips (outside the smallest set holding
    ``fraction`` of the mass) that also weigh < NEGLIGIBLE_SAMPLE_WEIGHT; not renormalised, as RELION's.

    Rotations left without weight are then not back-projected (most children of a local search's significant coarse
    rotations), which was most of storeWeightedSums. The second condition bounds what a rounding-level change of a
    sample at the threshold can change (1e-5 of one particle), so tiling and rank count still give the same sums.
    """
    keep, _ = significant_set(gam, fraction, 0)
    return torch.where(keep | (gam >= NEGLIGIBLE_SAMPLE_WEIGHT), gam, torch.zeros((), dtype=gam.dtype, device=gam.device))


def _real_bmm(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Real (m, r, t) @ complex (m, t, J) -> complex (m, r, J), as one real product over the interleaved (Re, Im)
    pairs: no separate Re/Im products of strided views and no complex assembly (both were slow on the CPU)."""
    m, t, J = z.shape
    return torch.view_as_complex(torch.bmm(a, torch.view_as_real(z.contiguous()).reshape(m, t, 2 * J)).reshape(m, a.shape[1], J, 2))


def _store_chunk(batch, window, rows, off_fine, gam, pg, p2, rows8, g_class, g_coarse, acc_v, acc_w, acc_mass, sums: WeightedSums, settings, poses) -> torch.Tensor:
    """storeWeightedSums for particles ``rows``: per-rotation image sums (batched GEMMs) and the M-step statistics.

    gam (m, T4, 8L): posterior of each fine sample; pg (m, 8L, J) its projections; rows8 (m, 8L) rows in the batch union.
    The unmasked image is back-projected; the noise, scale and --norm statistics use the masked image, as RELION's
    (with --zero_mask its σ² is then ~the noise power times the mask's area fraction: sharper posteriors).
    Returns each particle's expected residual power Σ_j Σ Γ |X̃ − sCP|² (m,) of the masked image.
    """
    xu = _translated(batch.f_unmasked[rows], window, off_fine[rows])  # (m, T4, J)
    xm = _translated(batch.f_masked[rows], window, off_fine[rows])
    m, T4, J = xu.shape
    s = batch.scale[rows][:, None]
    ctf, inv_s2 = batch.ctf[rows], batch.inv_sigma2[rows]
    z = xu * (s * ctf * inv_s2)[:, None, :]
    gt = gam.transpose(1, 2)  # (m, 8L, T4)
    acc_v.index_add_(0, rows8.reshape(-1), _real_bmm(gt, z).reshape(-1, J))
    gsum = gam.sum(1)  # (m, 8L)
    acc_mass.index_add_(0, rows8.reshape(-1), gsum.reshape(-1))
    acc_w.index_add_(0, rows8.reshape(-1), (gsum[:, :, None] * ((s * ctf) ** 2 * inv_s2)[:, None, :]).reshape(-1, J))
    q = _real_bmm(gam, pg).conj()  # Σ_r Γ conj(P): (m, T4, J)
    xq = (xm * q).real.sum(1)  # Re Σ_t X̃ Σ_r Γ conj(P)
    del xm
    pp = torch.einsum("mr,mrj->mj", gsum, p2)
    scored = window.scored.double()  # noise and scale statistics over RELION's Mresol_fine pixels
    resid = ((batch.f_masked[rows].abs() ** 2).double() + ((s * ctf) ** 2 * pp - 2.0 * s * ctf * xq).double()) * scored
    xa, aa = (ctf * xq).double() * scored, (ctf**2 * pp).double() * scored
    S = sums.sigma2_noise.shape[1]
    shell = window.shell.clamp(max=S - 1)
    flat_gs = (batch.group[rows][:, None] * S + shell[None, :]).reshape(-1)
    for a_, v in ((sums.sigma2_noise, resid), (sums.scale_xa, xa), (sums.scale_aa, aa)):
        a_.view(-1).index_add_(0, flat_gs, v.reshape(-1))
    sums.sigma2_count.view(-1).index_add_(0, flat_gs, scored.expand(m, J).reshape(-1))
    g_of_row = rows8.reshape(-1) // N_ROT_CHILDREN
    wrow = gsum.reshape(-1).double()
    sums.class_weight.index_add_(0, g_class[g_of_row], wrow)
    D = sums.direction_weight.shape[1]
    sums.direction_weight.view(-1).index_add_(0, g_class[g_of_row] * D + g_coarse[g_of_row] // poses.sampling.n_psi, wrow)
    tw = gam.sum(2)  # (m, T4)
    off2 = ((off_fine[rows] * settings.angpix) ** 2).sum(-1)
    sums.offset_sq_angst2 += (tw.double() * off2.double()).sum()
    sums.offset_weight += 2.0 * tw.double().sum()
    return resid.sum(1)
