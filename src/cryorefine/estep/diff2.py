"""getAllSquaredDifferences: the scores of the coarse and the fine pass, and the priors they are combined with.

diff2(i, k, r, t) = Σ_j |X̃_ij(t) − s C_ij P_krj|² / (2σ²_j), expanded as
const_i − 2 Re⟨a_i(t), P_kr⟩ + ⟨b_i, |P_kr|²⟩ with a = s C X̃ / (2σ²), b = s² C² / (2σ²), so both passes are matrix
products: the coarse pass over shared rotations one GEMM (local searches: one batched GEMM per particle), the fine pass
one batched GEMM per particle over its own slots. Scores leave out the per-particle constant Σ |X̃|² / (2σ²).
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass
from functools import partial

import torch

from ..projection.extract import (
    PaddedTransform,
    extract_central_slices_planar,
    extract_planar_with_power,
)
from ..transfer import to_device
from . import coarse_epilogue, fused_local
from .images import ImageBatch, Window
from .memory import LOCAL_GATHER_ELEMENTS
from .poses import N_ROT_CHILDREN, N_TRANS_CHILDREN, PoseGrid
from .precision import matmul_nt
from .settings import EStepSettings
from .slots import FineSlots


ALIGNED_PIXELS = 8  # a global search's coarse pixels on a GPU, padded to a multiple of this (product_pixels)


def product_pixels(jc: int, local: bool, on_gpu: bool) -> int:
    """The coarse products' pixels for ``jc`` coarse pixels: on a GPU a global search's are padded to whole 32-byte
    rows of the operands. cuBLAS's Hopper kernels need them: with 2·jc = 2102 (betagal-like, order 3) an H100 took
    its sm80 TF32 kernel at 118 TFLOP/s, with 2104 303 TFLOP/s (bench/gemm_alignment.py, 2026-12-06)."""
    return -(-jc // ALIGNED_PIXELS) * ALIGNED_PIXELS if on_gpu and not local else jc


def as_real(z: torch.Tensor) -> torch.Tensor:
    """(..., j) complex -> (..., 2j) real [Re, Im]."""
    return torch.cat([z.real, z.imag], -1)


def interleaved(z: torch.Tensor) -> torch.Tensor:
    """(..., j) complex -> (..., 2j) real as (Re, Im) pairs: a view where z's pixels are contiguous. Products of two
    operands in this layout are as_real's sums in another order, without its copies (the fine pass's)."""
    return torch.view_as_real(z).flatten(-2)


def translated(x: torch.Tensor, window: Window, centre_px: torch.Tensor, grid_px: torch.Tensor) -> torch.Tensor:
    """X̃ = X moved by each particle's centre plus each offset of a grid: x (n, j), centre_px (n, 2), grid_px (T, 2) ->
    (n, T, j). The phase factor of a sum of shifts is the product of theirs, so the images are moved to their centres
    once (n, j) and the grid's factors (T, j) multiply them: one complex product per sample and pixel, where a sine and
    cosine per sample and pixel were most of the cost of shifting on the CPU."""
    j = x.shape[-1]
    centred = x * window.phase_shift_factors(centre_px, j)
    return centred[:, None, :] * window.phase_shift_factors(grid_px, j)[None]


def score_weights(batch: ImageBatch, window: Window, cc: bool) -> torch.Tensor:
    """(n, j) weight of each pixel in the scores: 1/(2σ²) for diff2; 1 for RELION's --firstiter_cc cross-correlation
    −Σ Re(X·conj(CP)) / √Σ|CP|², which is not noise-whitened (the image's own norm, a constant per particle, is left
    out: it does not change which pose is best). 0 on the redundant half of the kx = 0 column (Window.scored)."""
    return (torch.ones_like(batch.inv_sigma2) if cc else batch.inv_sigma2 * 0.5) * window.scored


def score_operands(
    x_moved: torch.Tensor, w: torch.Tensor, sc: torch.Tensor, real=as_real
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands of the expansion: a = X̃·w·sC as real (n, T, 2j) (in the layout ``real``: as_real or
    interleaved) from moved images (n, T, j), and b = w·(sC)² (n, j), from the score weights w (n, j) and the scaled
    CTF sC (n, j)."""
    return real(x_moved * (w * sc)[:, None, :]), w * sc * sc


def scores_from_products_(cross: torch.Tensor, third: torch.Tensor, cc: bool) -> torch.Tensor:
    """The score −diff2 less its constant, 2·cross − third, or the CC = cross / √third with ``cc``, written over
    ``cross`` (n, T, R) and returned; third (n, R). In place: the coarse array is the E-step's largest (each pass
    over it costs as much as a small product on the CPU), so no copy of it is made."""
    if cc:
        return cross.div_(torch.sqrt(third.clamp(min=1e-30))[:, None, :])
    return cross.mul_(2.0).sub_(third[:, None, :])


def coarse_scores(
    batch: ImageBatch,
    window: Window,
    jc: int,
    refs: Sequence[PaddedTransform],
    poses: PoseGrid,
    local=None,
    cc=False,
    precision: str = "fp32",
    assemble=None,
):
    """Coarse pass: the scores −diff2 without the per-particle constant, (n, K, T, L).

    ``local`` = (ids (n, L), log_prior, valid) for per-particle rotation sets; else all R coarse rotations.
    With ``cc`` the score is the CC (RELION's --firstiter_cc cross-correlation, score_weights).
    ``precision``: of the two matrix products (precision.py); the scores are assembled from them in float32.
    ``assemble(k, cross, third)``: class k's scores from its products, in place (default scores_from_products_).
    """
    ky, kx = window.map_ky[:jc], window.map_kx[:jc]  # where the projections sample the references
    w = score_weights(batch, window, cc)[:, :jc]
    sc = batch.scale[:, None] * batch.ctf[:, :jc] * window.in_circle(window.shell_of_prefix(jc))[:jc]  # P = 0 beyond
    xt = translated(batch.f_masked[:, :jc], window, batch.old_offset_px, poses.translations_px)  # (n, T, jc)
    pad = product_pixels(jc, local is not None, xt.is_cuda) - jc
    if pad:  # pixels of weight 0 (at the origin): the products are unchanged
        xt, w, sc, ky, kx = (torch.nn.functional.pad(t, (0, pad)) for t in (xt, w, sc, ky, kx))
    a, b = score_operands(xt, w, sc)  # (n, T, 2jc), (n, jc)
    n, T = a.shape[:2]
    if local is not None:
        fused = fused_local.available(a, precision)
        if fused:  # the fused kernel interpolates per candidate anyway: each one's matrix (torch.unique would wait)
            ids = local[0]
            rotations = poses.rotations(ids.reshape(-1))
            rows = torch.arange(ids.numel(), device=ids.device).view(ids.shape)  # (n, L) rows of ``rotations``
        else:  # the gathered path extracts each distinct rotation's slice once
            uniq, rows = torch.unique(local[0], return_inverse=True)  # (U,), (n, L) rows of the distinct rotations
            rotations = poses.rotations(uniq)
        # the fused kernel skips each particle's padding (the valid candidates come first)
        scores = partial(fused_local.local_scores, counts=local[2].sum(1)) if fused else local_scores_gathered
    out = None
    for k, ref in enumerate(refs):
        if local is None:
            p = poses.coarse_projections(ref, k, ky, kx)  # (R, 2, jc)
            cross = matmul_nt(a.reshape(n * T, -1), p.reshape(p.shape[0], -1), precision).reshape(n, T, -1)
            third = matmul_nt(b, p.square().sum(1), precision)  # (n, R)
        else:
            cross, third = scores(ref, rotations, rows, ky, kx, a, b, precision=precision)
        class_scores = scores_from_products_(cross, third, cc) if assemble is None else assemble(k, cross, third)
        if len(refs) == 1:
            return class_scores[:, None]
        if out is None:
            out = class_scores.new_empty(n, len(refs), *class_scores.shape[1:])
        out[:, k] = class_scores
    return out


def fine_scores(
    x_moved: torch.Tensor,
    w: torch.Tensor,
    sc: torch.Tensor,
    proj: torch.Tensor,
    proj_power: torch.Tensor,
    cc: bool,
) -> torch.Tensor:
    """Fine pass of m particles against their own slots: the scores −diff2 without the constant (or the CC),
    (m, T4, 8L).

    x_moved (m, T4, js) the masked images at the fine translations, w and sc (m, js) score weights and scaled CTF,
    proj (m, 8L, J) and proj_power |proj|² (m, 8L, J) the slots' projections (only their first js pixels are scored).
    One batched matrix product per particle.
    """
    js = x_moved.shape[-1]
    a, b = score_operands(x_moved, w, sc, interleaved)  # (m, T4, 2js), (m, js)
    cross = torch.bmm(a, interleaved(proj[..., :js]).transpose(1, 2))  # (m, T4, 8L)
    third = torch.einsum("mj,mrj->mr", b, proj_power[..., :js])  # (m, 8L)
    return scores_from_products_(cross, third, cc)


def local_scores_gathered(transform, rotations, idx, ky, kx, a, b, precision="fp32"):
    """fused_local.local_scores's results: each distinct rotation's slice extracted once, then each particle's
    products with its candidates, on the CPU by a compiled loop (cpu_scores.py), else gathered per particle in blocks
    and multiplied (other precisions, GPUs without the fused kernel)."""
    # the real operand [Re | Im] (a view) and |P|² once per distinct rotation, not per (particle, candidate):
    # the gathers below are then plain row copies
    pu, pu_pow = extract_planar_with_power(transform, rotations, ky, kx)  # (U, 2, jc), (U, jc)
    pu_real = pu.reshape(pu.shape[0], -1)  # (U, 2jc)
    if a.device.type == "cpu" and precision == "fp32":
        from . import cpu_scores  # numba: imported only where it runs

        return cpu_scores.local_products(pu_real, pu_pow, idx, a, b)
    (n, T, _), L, jc = a.shape, idx.shape[1], ky.numel()
    cross = a.new_empty(n, T, L)
    third = a.new_empty(n, L)
    step = max(1, LOCAL_GATHER_ELEMENTS // max(1, L * jc))  # particles per gathered (m, L, jc) block
    for c0 in range(0, n, step):
        sel = idx[c0 : c0 + step]  # (m, L)
        cross[c0 : c0 + step] = matmul_nt(a[c0 : c0 + step], pu_real[sel], precision)  # (m, T, L)
        third[c0 : c0 + step] = matmul_nt(b[c0 : c0 + step, None, :], pu_pow[sel], precision)[:, 0]
    return cross, third


def coarse_gemm_flops(n: int, K: int, T: int, L: int, jc: int, local: bool, on_gpu: bool = False) -> tuple[float, list]:
    """Floating-point operations of the coarse pass's matrix products and their shapes, for n particles.

    Per reference: the cross term (n·T, 2jc) @ (2jc, L) and the |P|² term (n, jc) @ (jc, L) (global search, one
    GEMM each), or per particle (T, 2jc) @ (2jc, L) and (1, jc) @ (jc, L) (local searches, batched). 2·M·K·N each,
    over the jc pixels (not the padding of product_pixels, which the shapes show).
    Returns (flops, [(shape key, calls)]) with keys 'mm:MxKxN' or 'bmm:BxMxKxN'.
    """
    flops = K * (2.0 * n * T * 2 * jc * L + 2.0 * n * jc * L)
    if local:
        shapes = [(f"bmm:{n}x{T}x{2 * jc}x{L}", K), (f"bmm:{n}x1x{jc}x{L}", K)]
    else:
        j = product_pixels(jc, local, on_gpu)
        shapes = [(f"mm:{n * T}x{2 * j}x{L}", K), (f"mm:{n}x{j}x{L}", K)]
    return flops, shapes


def translation_log_prior(
    offsets_abs_px: torch.Tensor, settings: EStepSettings, centre_px: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, T) the Gaussian offset prior's log of absolute offsets (n, T, 2) px, centred on ``centre_px`` (n, 2) (the
    particles' rlnOriginX/YPriorAngst; None: 0)."""
    d = offsets_abs_px if centre_px is None else offsets_abs_px - centre_px[:, None, :]
    return -(d**2).sum(-1) * settings.angpix**2 / (2.0 * settings.sigma2_offset_angst2)


def coarse_log_posterior(batch, window, jc, refs, poses, settings, local_prior, forced_class):
    """The coarse pass as log-posteriors (n, K, T, L) (−diff2 + priors; −CC with --firstiter_cc), the rotation log
    prior (n, K, L), and where a global search's scores were assembled by coarse_epilogue (CUDA), their blocks'
    (largest, Σ exp) for the significant set (weights.significant_from_blocks), else None."""
    dev = batch.f_masked.device
    n, K = len(batch), len(refs)
    cc = settings.firstiter_cc
    L = poses.n_rotations if local_prior is None else local_prior[0].shape[1]
    rot_prior = torch.zeros(n, K, L, device=dev)  # log prior of each coarse rotation slot
    if cc:
        logp = coarse_scores(batch, window, jc, refs, poses, local_prior, cc=cc, precision=settings.precision)
        if local_prior is not None:
            logp.masked_fill_(~local_prior[2][:, None, None, :], -torch.inf)
        return _forced(logp, forced_class), rot_prior, None
    if local_prior is not None:
        rot_prior = (
            rot_prior
            + torch.where(local_prior[2], local_prior[1], torch.full_like(local_prior[1], -torch.inf))[:, None, :]
        )
    elif settings.direction_log_prior is not None:
        dir_of_rot = torch.arange(L, device=dev) // poses.sampling.n_psi
        # the prior lives on the host (the run's state): through pinned memory, or each tile would wait here
        rot_prior = rot_prior + to_device(settings.direction_log_prior, dev, torch.float32)[:, dir_of_rot][None]
    trans_prior = translation_log_prior(
        batch.old_offset_px[:, None, :] + poses.translations_px[None], settings, batch.offset_prior_px
    )  # (n, T)
    has_rot_prior = local_prior is not None or settings.direction_log_prior is not None  # else zero
    if local_prior is None and forced_class is None and coarse_epilogue.usable(batch.inv_sigma2, L):
        stats = coarse_epilogue.BlockStats.empty(n, K * poses.n_translations * L, dev)

        def assemble(k, cross, third):
            prior = rot_prior[0, k][None] if has_rot_prior else None  # a global search's is every particle's
            return coarse_epilogue.assemble_scores_(cross, third, trans_prior, prior, stats, k)

        logp = coarse_scores(batch, window, jc, refs, poses, precision=settings.precision, assemble=assemble)
        return logp, rot_prior, (stats.largest, stats.sum_exp)
    logp = coarse_scores(batch, window, jc, refs, poses, local_prior, precision=settings.precision)
    logp.add_(trans_prior[:, None, :, None])  # in place, as the scores (scores_from_products_)
    if has_rot_prior:
        logp.add_(rot_prior[:, :, None, :])
    return _forced(logp, forced_class), rot_prior, None


def _forced(logp: torch.Tensor, forced_class: torch.Tensor | None) -> torch.Tensor:
    """The log-posteriors (n, K, T, L) with every class but each particle's ``forced_class`` (n,) at −inf."""
    if forced_class is not None:
        held = torch.arange(logp.shape[1], device=logp.device)[None, :] == forced_class.to(logp.device)[:, None]
        logp.masked_fill_(~held[:, :, None, None], -torch.inf)
    return logp


@dataclass(frozen=True)
class FinePassInputs:
    """What every particle of a tile brings to the fine pass."""

    w: torch.Tensor  # (n, J) score weights
    sc: torch.Tensor  # (n, J) scale × CTF
    offsets_px: torch.Tensor  # (n, T4, 2) absolute fine offsets: each particle's previous offset plus grid_px
    grid_px: torch.Tensor  # (T4, 2) the fine translations
    offset_log_prior: torch.Tensor  # (n, T4) of each fine offset: its coarse translation's, as RELION
    scored: int  # pixels scored (--strict_highres_exp); all J are stored
    constant: torch.Tensor  # (n,) float64 Σ w|X|² over the scored pixels, the constant the scores leave out


def fine_pass_inputs(batch: ImageBatch, window: Window, poses: PoseGrid, settings: EStepSettings) -> FinePassInputs:
    T = poses.n_translations
    w = score_weights(batch, window, settings.firstiter_cc)
    grid = poses.fine_translations().reshape(T * N_TRANS_CHILDREN, 2)
    offsets = batch.old_offset_px[:, None, :] + grid[None]
    # RELION's convertAllSquaredDifferencesToWeights takes the offset prior at the coarse translation for all its
    # fine children (the prior at each fine offset favours the children nearer the centre: other posteriors)
    coarse = batch.old_offset_px[:, None, :] + poses.translations_px[None]
    prior = translation_log_prior(coarse, settings, batch.offset_prior_px).repeat_interleave(N_TRANS_CHILDREN, 1)
    score_shell = window.max_shell if settings.score_shell is None else settings.score_shell
    js = window.prefix(score_shell)
    constant = (w[:, :js] * batch.f_masked[:, :js].abs() ** 2).sum(1).double()
    sc = batch.scale[:, None] * batch.ctf * window.in_circle(score_shell)  # the scores' projections stop at its radius
    return FinePassInputs(w, sc, offsets, grid, prior, js, constant)


def fine_projections(
    refs: Sequence[PaddedTransform], poses: PoseGrid, slots: FineSlots, window: Window, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 fine rotations of every (class, coarse rotation) pair of the tile's union and their projections:
    ((G·8, 3, 3), (G·8, J))."""
    rotations = poses.fine_rotations(slots.g_coarse).reshape(-1, 3, 3)
    proj = torch.empty(rotations.shape[0], window.size, dtype=dtype, device=rotations.device)
    bounds = slots.class_bounds  # each class's rotations are a run of the union
    for k in range(len(refs)):
        a, b = bounds[k] * N_ROT_CHILDREN, bounds[k + 1] * N_ROT_CHILDREN
        if b > a:  # refs[k] only then: references in host memory are copied to the device when asked for
            planes = extract_central_slices_planar(refs[k], rotations[a:b], window.map_ky, window.map_kx)
            torch.complex(planes[:, 0], planes[:, 1], out=proj[a:b])  # interleaved once, in place: (G·8, J) is large
    # RELION's projector stops at the window's radius: only pixels of the last shell lie beyond it (sorted by shell)
    last = window.prefix(window.max_shell - 1)
    proj[:, last:] *= window.in_circle(window.max_shell)[last:]
    return rotations, proj


def fine_log_posterior(
    moved: torch.Tensor,
    fine: FinePassInputs,
    slots: FineSlots,
    rows: torch.Tensor,
    n_slots: int,
    proj: torch.Tensor,
    cc: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fine pass of the particles ``rows``, their masked images ``moved`` (m, T4, J) at the fine translations
    (translated), over their first ``n_slots`` slots: log-scores (m, T4, 8L) (−diff2 plus
    the offset and rotation log priors, or the CC; −inf where the coarse sample was not significant), the rows of
    their slots' rotations in ``proj`` (m, 8L), and those projections and their power (m, 8L, J)."""
    m = len(rows)
    child = torch.arange(N_ROT_CHILDREN, device=rows.device)
    rows8 = (slots.slot_g[rows, :n_slots][:, :, None] * N_ROT_CHILDREN + child).reshape(m, -1)
    pg = proj[rows8]
    p2 = pg.real**2 + pg.imag**2
    js = fine.scored
    lg = fine_scores(moved[..., :js], fine.w[rows, :js], fine.sc[rows, :js], pg, p2, cc)  # (m, T4, 8L), new
    # in place on the (m, T, 4, L, 8) view (translation and rotation children consecutive): no repeated copies of the
    # per-slot prior and mask
    by_child = lg.view(m, -1, N_TRANS_CHILDREN, n_slots, N_ROT_CHILDREN)
    if not cc:
        lg.add_(fine.offset_log_prior[rows][:, :, None])
        by_child.add_(slots.slot_prior[rows, :n_slots][:, None, None, :, None])
    by_child.masked_fill_(~slots.allowed[rows, :, :n_slots][:, :, None, :, None], -torch.inf)
    return lg, rows8, pg, p2
