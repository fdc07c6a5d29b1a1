"""Fourier shell correlation over RELION's integer shells, and resolution at a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fourier.grids import centred_half_radius, rfft3_centered, shell_index_3d, shell_sum


def fsc_curve(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
    """FSC (d//2 + 1,) between two (d, d, d) maps over shells round(|k|); shell 0 is DC."""
    d = map1.shape[-1]
    f1 = rfft3_centered(map1.to(torch.float64))
    f2 = rfft3_centered(map2.to(torch.float64))
    shells = shell_index_3d(d, map1.device).flatten()
    n = d // 2 + 1
    keep = shells < n
    s = shells[keep]

    def by_shell(x):
        return shell_sum(x.flatten()[keep], s, n)

    num = by_shell((f1 * f2.conj()).real)
    den = torch.sqrt(by_shell(f1.abs() ** 2) * by_shell(f2.abs() ** 2))
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """RELION's ROUND: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def downsampled_average(bp, max_shell: int) -> torch.Tensor:
    """RELION's BackProjector::getDownsampledAverage: the padded accumulators summed into original-grid voxels
    (padded index k -> ROUND(k / pad) per axis), data / weight where weight > 0, else 0. Only the padded cube that
    holds shells <= ``max_shell`` is read. Returns (n, n, m) complex128, centred in the first two axes (index
    i -> frequency i - n // 2), x from 0. The binning is separable, so it runs one axis at a time (index_add_)."""
    P, pad = bp.size, bp.pad
    c = P // 2
    h = min(c, (max_shell + 1) * pad)
    lo, hi = c - h, min(P, c + h + 1)
    # sums of ≤ pad³ values in the accumulators' precision (float32: a box-360 grid in float64 would need ~4 GiB)
    x = torch.cat(
        [torch.view_as_real(bp.data[lo:hi, lo:hi, : h + 1]), bp.weight[lo:hi, lo:hi, : h + 1, None]], -1
    )  # real, imag, weight
    dev = x.device
    k = _round_half_away((torch.arange(lo, hi, device=dev, dtype=torch.float64) - c) / pad).long()
    kx = _round_half_away(torch.arange(h + 1, device=dev, dtype=torch.float64) / pad).long()
    m = int(k.abs().max())
    for dim, idx, n in ((0, k + m, 2 * m + 1), (1, k + m, 2 * m + 1), (2, kx, int(kx.max()) + 1)):
        shape = list(x.shape)
        shape[dim] = n
        x = torch.zeros(shape, dtype=x.dtype, device=dev).index_add_(dim, idx, x)
    x = x.to(torch.float64)
    w = x[..., 2]
    avg = torch.complex(x[..., 0], x[..., 1]) / w.clamp(min=1e-300)
    return torch.where(w > 0, avg, torch.zeros((), dtype=avg.dtype, device=dev))


def halves_fsc(bp1, bp2, max_shell: int) -> torch.Tensor:
    """Gold-standard FSC (d//2 + 1,) of two half sets' accumulators in Fourier space, RELION's compareTwoHalves
    (getDownsampledAverage + calculateDownSampledFourierShellCorrelation): voxels of the downsampled averages with
    radius R <= max_shell, in shells ROUND(R); FSC(0) = 1, 0 where a shell is empty. No reconstruction is needed:
    intermediate auto-refine iterations take their resolution from this."""
    a1, a2 = downsampled_average(bp1, max_shell), downsampled_average(bp2, max_shell)
    n0, _, nx = a1.shape
    r = centred_half_radius(torch.arange(n0, device=a1.device) - n0 // 2, nx)
    n = bp1.box // 2 + 1
    keep = (r <= max_shell) & (r < n - 0.5)
    shell = _round_half_away(r[keep]).long()

    def by_shell(v):
        return shell_sum(v[keep], shell, n)

    num = by_shell((a1 * a2.conj()).real)
    den = by_shell(a1.abs() ** 2) * by_shell(a2.abs() ** 2)
    fsc = torch.where(den > 0, num / den.clamp(min=1e-300).sqrt(), torch.zeros_like(num))
    fsc[0] = 1.0
    return fsc


def resolution_shell(fsc: torch.Tensor, threshold: float, consecutive: int = 1) -> int:
    """Last shell before the FSC first drops below ``threshold`` for ``consecutive`` shells in a row (shells from 1).

    0 if it is already below at shell 1. ``consecutive`` = 2 ignores single-shell dips of noisy curves.
    """
    below = (fsc[1:] < threshold).to(torch.int64)
    if consecutive > 1:
        runs = below.unfold(0, consecutive, 1).prod(1) if below.numel() >= consecutive else below[:0]
        runs = torch.cat([runs, below[len(runs) :]])
        below = runs
    idx = below.nonzero()
    return int(fsc.numel() - 1 if idx.numel() == 0 else idx[0, 0])


def shell_to_angstrom(shell: float, box: int, angpix: float) -> float:
    return float("inf") if shell <= 0 else box * angpix / shell


def resolution_angstrom(fsc: torch.Tensor, threshold: float, box: int, angpix: float) -> float:
    return shell_to_angstrom(resolution_shell(fsc, threshold), box, angpix)


def fsc_to_ssnr(fsc: torch.Tensor, fudge: float = 1.0, whole: bool = False) -> torch.Tensor:
    """SSNR T·FSC/(1−FSC) of a half map from the half-set FSC (clipped to >= 0.001, then <= 0.999, as RELION).

    ``whole``: of the map from both halves, via RELION's FSC' = √(2·FSC/(1+FSC)) (twice the particles).
    """
    f = fsc.clamp(min=0.001)
    if whole:
        f = torch.sqrt(2.0 * f / (f + 1.0))
    f = f.clamp(max=0.999)
    return fudge * f / (1.0 - f)


def phase_randomised(volume: torch.Tensor, from_shell: int, generator: torch.Generator) -> torch.Tensor:
    """RELION's randomizePhasesBeyond: the (d, d, d) map with every Fourier component at |k|² >= ``from_shell``² (k in
    px⁻¹ of the box) given a uniform random phase, its amplitude kept. float64."""
    d = volume.shape[-1]
    f = torch.fft.rfftn(volume.to(torch.float64))
    k = torch.fft.fftfreq(d, 1.0 / d, dtype=torch.float64, device=f.device)
    kx = torch.arange(d // 2 + 1, dtype=torch.float64, device=f.device)
    far = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2 >= from_shell**2
    phase = torch.rand(int(far.sum()), generator=generator, dtype=torch.float64) * (2 * torch.pi)
    f[far] = torch.polar(f[far].abs(), phase.to(f.device))
    return torch.fft.irfftn(f, s=volume.shape)


RANDOMISE_BELOW = 0.8  # RELION randomises phases from the first shell where the unmasked FSC drops below this


def first_shell_below(fsc: torch.Tensor, threshold: float) -> int | None:
    """The first shell past DC where ``fsc`` drops below ``threshold``; None if it never does."""
    drops = (fsc[1:] < threshold).nonzero()
    return int(drops[0, 0]) + 1 if drops.numel() else None


def masked_fscs(
    half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, from_shell: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(FSC of the masked half maps, FSC of the masked half maps with phases randomised from ``from_shell``), each
    (d//2 + 1,) float64."""
    g = torch.Generator().manual_seed(seed)
    mask = mask.to(half1)
    masked = fsc_curve(half1 * mask, half2 * mask)
    rand = fsc_curve(phase_randomised(half1, from_shell, g) * mask, phase_randomised(half2, from_shell, g) * mask)
    for curve in (masked, rand):  # RELION: the origin's FSC can come out -1
        if curve[0] <= 0:
            curve[0] = 1.0
    return masked, rand


def corrected_by_random_phases(masked: torch.Tensor, rand: torch.Tensor, from_shell: int) -> torch.Tensor:
    """Chen et al. (2013): (FSC_masked − FSC_random) / (1 − FSC_random) from two shells past ``from_shell`` (RELION
    moved it there from artefacts near the randomisation's edge), FSC_masked before."""
    corrected = masked.clone()
    tail = torch.arange(len(masked), device=masked.device) >= from_shell + 2
    corrected[tail] = (masked[tail] - rand[tail]) / (1.0 - rand[tail])
    return corrected


@dataclass(frozen=True)
class SolventCorrectedFSC:
    """relion_postprocess's curves (d//2 + 1,) for two half maps and a mask: the unmasked and masked FSC, the masked
    FSC of the maps with phases randomised from ``randomised_from`` (shells), and the corrected FSC
    (FSC_masked − FSC_random) / (1 − FSC_random) from two shells past it (Chen et al. 2013)."""

    unmasked: torch.Tensor
    masked: torch.Tensor
    random_masked: torch.Tensor
    corrected: torch.Tensor
    randomised_from: int


def solvent_corrected_fsc(
    half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, from_shell: int | None = None,
    below: float = RANDOMISE_BELOW, seed: int = 0,
) -> SolventCorrectedFSC:  # fmt: skip
    """RELION's masked FSC with phase randomisation (postprocessing.cpp): phases randomised from ``from_shell``, or
    from the first shell past DC where the unmasked FSC drops below ``below``. Raises ValueError if it never does."""
    unmasked = fsc_curve(half1, half2)
    if from_shell is None:
        from_shell = first_shell_below(unmasked, below)
        if from_shell is None:
            raise ValueError(f"the unmasked FSC never drops below {below}")
    masked, rand = masked_fscs(half1, half2, mask, from_shell, seed)
    return SolventCorrectedFSC(unmasked, masked, rand, corrected_by_random_phases(masked, rand, from_shell), from_shell)


def refine_solvent_corrected_fsc(
    half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, max_shell: int, seed: int = 0
) -> torch.Tensor:
    """Auto-refine's gold-standard FSC (d//2 + 1,) with --solvent_correct_fsc, from the unregularised half maps
    (d, d, d) and the solvent mask (RELION's reconstructUnregularisedMapAndCalculateSolventCorrectedFSC). As
    postprocessing's, but where the randomised FSC exceeds the masked one the corrected FSC is 0, where the unmasked
    FSC never drops below 0.8 it is used as it is (RELION warns that this should stop as the refinement proceeds),
    and shells beyond ``max_shell`` (the E-step window) are 0."""
    unmasked = fsc_curve(half1, half2)
    from_shell = first_shell_below(unmasked, RANDOMISE_BELOW)
    if from_shell is None:
        fsc = unmasked
    else:
        masked, rand = masked_fscs(half1, half2, mask, from_shell, seed)
        fsc = corrected_by_random_phases(masked, rand, from_shell)
        past = torch.arange(len(fsc), device=fsc.device) >= from_shell + 2
        fsc[past & (rand > masked)] = 0.0
    fsc[max_shell + 1 :] = 0.0
    return fsc
