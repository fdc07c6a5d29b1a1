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
from .sums import TileSums, WeightedSums


@dataclass
class FineChunk:
    """m particles of a tile in the fine pass, with their posterior."""

    rows: torch.Tensor  # (m,) the particles' rows in the tile
    rows8: torch.Tensor  # (m, 8L) rows of their slots' fine rotations in the tile's union (TileSums.rotations)
    offsets_px: torch.Tensor  # (m, T4, 2) absolute fine offsets
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
    xu = translated(batch.f_unmasked[rows], window, chunk.offsets_px)  # (m, T4, J)
    xm = translated(batch.f_masked[rows], window, chunk.offsets_px)
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
    sums.direction_weight.view(-1).index_add_(
        0, g_class[g_of_row] * D + g_coarse[g_of_row] // grid.sampling.n_psi, wrow
    )
    tw = gam.sum(2)  # (m, T4)
    off2 = ((chunk.offsets_px * settings.angpix) ** 2).sum(-1)
    sums.offset_sq_angst2 += (tw.double() * off2.double()).sum()
    sums.offset_weight += 2.0 * tw.double().sum()
    return resid.sum(1)


def add_power_beyond_window(sums: WeightedSums, batch: ImageBatch, window: Window) -> None:
    """RELION's storeWeightedSums beyond the window: each image's own power spectrum enters σ² (weight 1 per particle,
    the posterior's total) at the shells up to Nyquist that the window left out, so σ² follows the data at every shell,
    not only inside the windows seen so far."""
    spectrum = batch.spectrum_outside  # (n, S), zero inside the window
    assert spectrum is not None, "the batch was prepared without its power beyond the window"
    npix = window.beyond()[2]
    sums.sigma2_noise.index_add_(0, batch.group, spectrum)
    sums.sigma2_count.index_add_(0, batch.group, npix.expand_as(spectrum).contiguous())
