"""storeWeightedSums: what the E-step adds for the M-step (back-projection sums per rotation, σ², scale, offset and
direction statistics), and the power beyond the window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .diff2 import translated
from .images import ImageBatch, Window
from .poses import N_ROT_CHILDREN, PoseGrid
from .settings import EStepSettings
from .slots import FineSlots
from .sums import ScaleShells, TileSums, WeightedSums


@dataclass
class FineChunk:
    """m particles of a tile in the fine pass, with their posterior."""

    rows: torch.Tensor  # (m,) the particles' rows in the tile
    rows8: torch.Tensor  # (m, 8L) rows of their slots' fine rotations in the tile's union (TileSums.rotations)
    offsets_px: torch.Tensor  # (m, T4, 2) absolute fine offsets: each particle's previous offset plus grid_px
    grid_px: torch.Tensor  # (T4, 2) the fine translations
    moved: torch.Tensor  # (m, T4, J) the masked images at the fine offsets (diff2.translated)
    gamma: torch.Tensor  # (m, T4, 8L) posterior of each fine sample
    proj: torch.Tensor  # (m, 8L, J) projections of the slots' fine rotations
    proj_power: torch.Tensor  # (m, 8L, J) their |P|²


def real_bmm(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Real (m, r, t) @ complex (m, t, J) -> complex (m, r, J), as one real product over the interleaved (Re, Im)
    pairs: no separate Re/Im products of strided views and no complex assembly (both were slow on the CPU)."""
    m, t, J = z.shape
    return torch.view_as_complex(
        torch.bmm(a, torch.view_as_real(z.contiguous()).reshape(m, t, 2 * J)).reshape(m, a.shape[1], J, 2)
    )


def store_weighted_sums(
    batch: ImageBatch,
    window: Window,
    chunk: FineChunk,
    slots: FineSlots,
    tile: TileSums,
    settings: EStepSettings,
    grid: PoseGrid,
) -> torch.Tensor:
    """storeWeightedSums for the particles of ``chunk``: per-rotation image sums into ``tile`` (batched GEMMs) and the
    M-step statistics into ``tile.stats``.

    The unmasked image is back-projected; the noise, scale and --norm statistics use the masked image, as RELION's
    (with --zero_mask its σ² is then ~the noise power times the mask's area fraction: sharper posteriors).
    Returns each particle's expected residual power Σ_j Σ Γ |X̃ − sCP|² (m,) of the masked image.
    """
    rows, rows8, gam, pg, p2 = chunk.rows, chunk.rows8, chunk.gamma, chunk.proj, chunk.proj_power
    sums, g_class, g_coarse = tile.stats, slots.g_class, slots.g_coarse
    xu = translated(batch.f_unmasked[rows], window, batch.old_offset_px[rows], chunk.grid_px)  # (m, T4, J)
    xm = chunk.moved
    m, T4, J = xu.shape
    s = batch.scale[rows][:, None]
    # nothing is back-projected beyond the window's radius (RELION's BackProjector r_max; fine_projections)
    inside = window.in_circle(window.max_shell)
    ctf, inv_s2 = batch.ctf[rows] * inside, batch.inv_sigma2[rows]
    # the CTF the image is multiplied by: its CTF, or 1 where the data are CTF-premultiplied (RELION: the numerator
    # takes the image as it is, the weight s²·CTF² either way; batch.ctf is then CTF²)
    bp_ctf = ctf if batch.bp_ctf is None else batch.bp_ctf[rows] * inside
    z = xu * (s * bp_ctf * inv_s2)[:, None, :]
    gt = gam.transpose(1, 2)  # (m, 8L, T4)
    tile.values.index_add_(0, rows8.reshape(-1), real_bmm(gt, z).reshape(-1, J))
    gsum = gam.sum(1)  # (m, 8L)
    tile.mass.index_add_(0, rows8.reshape(-1), gsum.reshape(-1))
    tile.weights.index_add_(
        0,
        rows8.reshape(-1),
        (
            gsum[:, :, None] * (((s * ctf) ** 2 if batch.bp_ctf is None else s * s * ctf * bp_ctf) * inv_s2)[:, None, :]
        ).reshape(-1, J),
    )
    q = real_bmm(gam, pg).conj()  # Σ_r Γ conj(P): (m, T4, J)
    xq = (xm * q).real.sum(1)  # Re Σ_t X̃ Σ_r Γ conj(P)
    pp = torch.einsum("mr,mrj->mj", gsum, p2)
    xa, aa = scale_products(xq, pp, sums.scale_shells, window, xm, gam, gsum, pg, p2, g_class[rows8 // N_ROT_CHILDREN])
    scored = window.scored.double()  # noise and scale statistics over RELION's Mresol_fine pixels
    resid = ((batch.f_masked[rows].abs() ** 2).double() + ((s * ctf) ** 2 * pp - 2.0 * s * ctf * xq).double()) * scored
    xa, aa = (ctf * xa).double() * scored, (ctf**2 * aa).double() * scored
    S = sums.sigma2_noise.shape[1]
    group, scale_group = batch.group[rows], batch.scale_group[rows]  # noise per optics group, scale per micrograph
    sums.sigma2_noise.index_add_(0, group, window.shell_sums(resid, S))
    for a_, v in ((sums.scale_xa, xa), (sums.scale_aa, aa)):
        a_.index_add_(0, scale_group, window.shell_sums(v, S))
    sums.sigma2_count.index_add_(0, group, window.shell_sums(scored[None, :], S).expand(m, S))
    g_of_row = rows8.reshape(-1) // N_ROT_CHILDREN
    wrow = gsum.reshape(-1).double()
    sums.class_weight.index_add_(0, g_class[g_of_row], wrow)
    D = sums.direction_weight.shape[1]
    sums.direction_weight.view(-1).index_add_(
        0, g_class[g_of_row] * D + g_coarse[g_of_row] // grid.sampling.n_psi, wrow
    )
    tw = gam.sum(2)  # (m, T4)
    centre = batch.offset_prior_px
    from_centre = chunk.offsets_px if centre is None else chunk.offsets_px - centre[rows][:, None, :]
    off2 = ((from_centre * settings.angpix) ** 2).sum(-1)
    sums.offset_sq_angst2 += (tw.double() * off2.double()).sum()
    sums.offset_weight += 2.0 * tw.double().sum()
    return resid.sum(1)


def scale_products(
    xq: torch.Tensor,
    pp: torch.Tensor,
    shells: ScaleShells | None,
    window: Window,
    xm: torch.Tensor,
    gam: torch.Tensor,
    gsum: torch.Tensor,
    pg: torch.Tensor,
    p2: torch.Tensor,
    slot_class: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re Σ_t X̃_t Σ_r Γ conj(P_r) and Σ_r Γ |P_r|² (m, J), each over the samples whose class takes the pixel's shell
    into the scale's sums (``shells``; None: every sample): ``xq`` and ``pp`` (m, J), the sums over every sample, where
    every class takes the shell; where the classes differ (a band of a few shells), the samples of the classes that
    take it, from the translated masked images ``xm`` (m, T4, J), posteriors ``gam`` (m, T4, 8L) and their sums
    ``gsum`` (m, 8L), the projections ``pg`` and their power ``p2`` (m, 8L, J) and each slot's class (m, 8L)."""
    if shells is None:
        return xq, pp
    shell = window.map_shell.clamp(max=shells.common.numel() - 1)
    xa, aa = xq * shells.common[shell], pp * shells.common[shell]
    lo, hi = window.map_prefix(shells.band[0] - 1), window.map_prefix(shells.band[1])
    if hi > lo:
        own = (shells.take - shells.common)[slot_class][..., shell[lo:hi]]  # (m, 8L, b): the class's own shells
        xa[:, lo:hi] += (xm[:, :, lo:hi] * real_bmm(gam, pg[:, :, lo:hi] * own).conj()).real.sum(1)
        aa[:, lo:hi] += torch.einsum("mr,mrj->mj", gsum, p2[:, :, lo:hi] * own)
    return xa, aa


def add_power_beyond_window(sums: WeightedSums, batch: ImageBatch, window: Window) -> None:
    """RELION's storeWeightedSums beyond the window: each image's own power spectrum enters σ² (weight 1 per particle,
    the posterior's total) at the shells up to Nyquist that the window left out, so σ² follows the data at every shell,
    not only inside the windows seen so far."""
    spectrum = batch.spectrum_outside  # (n, d//2+1), zero inside the window
    assert spectrum is not None, "the batch was prepared without its power beyond the window"
    npix = window.beyond()[2]
    n = npix.numel()  # this box's shells: a larger optics group's σ² has more
    sums.sigma2_noise[:, :n].index_add_(0, batch.group, spectrum)
    sums.sigma2_count[:, :n].index_add_(0, batch.group, npix.expand_as(spectrum).contiguous())
