"""The M-step's reconstructions as functions of the accumulators: auto-refine's two half sets (joined at low
resolution, compared, each regularised by their gold-standard FSC) and classification's classes (each regularised by
the power of the reference it was aligned to). The noise and prior statistics are mstep/statistics.py's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..fourier.grids import centred_half_radius, relion_round
from ..projection.insert import BackProjector
from ..reconstruction.padded_fft import SAME_DEVICE, SlabDevices
from ..reconstruction.fsc import fsc_curve, fsc_to_ssnr, halves_fsc, refine_solvent_corrected_fsc
from ..reconstruction.reconstruct import (
    MIN_REGULARISED_SHELL,
    data_vs_prior,
    fourier_completeness,
    reconstruct,
)
from .tau2 import reconstruct_gold_standard


def join_at_low_resolution_(bps: list[BackProjector], join_angst: float, angpix: float) -> None:
    """RELION's joinTwoHalvesAtLowResolution, in place: both half sets' accumulators summed on the padded radii
    <= ROUND(pad · CEIL(box·angpix / join_angst)). Only the cube about the origin that holds that sphere is touched
    (the low-resolution sums are a small share of the grid)."""
    box, pad, size = bps[0].box, bps[0].pad, bps[0].size
    join_r_pad = relion_round(pad * math.ceil(box * angpix / join_angst))
    c = size // 2
    h = min(c, join_r_pad + 1)
    cube = (slice(c - h, min(size, c + h + 1)), slice(c - h, min(size, c + h + 1)), slice(0, h + 1))
    k = torch.arange(c - h, min(size, c + h + 1), device=bps[0].weight.device) - c
    r_pad = centred_half_radius(k, min(h + 1, size // 2 + 1))
    low = torch.round(r_pad**2) <= join_r_pad**2
    d_sum = bps[0].data[cube] + bps[1].data[cube]
    w_sum = bps[0].weight[cube] + bps[1].weight[cube]
    for bp in bps:
        bp.data[cube] = torch.where(low, d_sum, bp.data[cube])
        bp.weight[cube] = torch.where(low, w_sum, bp.weight[cube])


def resolution_from_data_vs_prior(data_vs_prior, box: int, min_shell: int = MIN_REGULARISED_SHELL) -> int:
    """RELION's updateCurrentResolution for gold-standard refinement: one shell inside the first where the spectral
    data-to-prior ratio (T·FSC/(1−FSC) of the halves) drops below 1; but if, searching from d/2 − 1 downwards, a shell
    more than 3 shells higher still has a ratio above 1, that one (FSC curves that dip and rise again); at least
    ``min_shell`` (minres_map)."""
    dvp = [float(v) for v in data_vs_prior]
    ires = 1
    while ires < box // 2 and dvp[ires] >= 1.0:
        ires += 1
    ires -= 1
    ires2 = box // 2 - 1
    while ires2 >= ires and not dvp[ires2] > 1.0:
        ires2 -= 1
    if ires2 > ires + 3:
        ires = ires2
    return max(ires, min_shell)


@dataclass(frozen=True)
class HalfSetMaps:
    """The M-step of the two half sets: their FSC and the resolution it gives, and either the next references
    (intermediate iterations) or the final map with the unfiltered half maps."""

    fsc: torch.Tensor  # (d//2+1,) gold-standard FSC (float64, CPU)
    resolution_shell: int  # RELION's resolution from the data-to-prior ratio
    tau2: list[torch.Tensor]  # τ² per half set (intermediate) or of the joined map (final), (d//2+1,) CPU
    completeness: list[torch.Tensor]  # rlnFourierCompleteness per shell, as tau2: per half set or of the joined map
    references: list[torch.Tensor] | None = None  # (d, d, d) per half set, on the accumulators' device
    final_map: torch.Tensor | None = None  # (d, d, d) CPU
    unfiltered: list[torch.Tensor] | None = None  # (d, d, d) per half set, CPU


def maximize_half_sets(
    bps: list[BackProjector],
    particles: list[float],
    window_shell: int,
    tau2_fudge: float,
    gridding_iterations: int,
    final: bool,
    settle=None,
    solvent_mask: torch.Tensor | None = None,
    devices: SlabDevices = SAME_DEVICE,
) -> HalfSetMaps:
    """RELION's gold-standard M-step of two (symmetrised, joined) half sets with ``particles`` (their posterior mass)
    each. Intermediate iterations compare the accumulators in Fourier space (compareTwoHalves, no reconstruction) and
    reconstruct each half regularised by that FSC over ``window_shell``; the final one compares the unfiltered half
    maps and reconstructs both halves joined, with the FSC of the whole (twice the particles). With ``solvent_mask``
    (d, d, d) (--solvent_correct_fsc) every iteration's FSC is that of the unregularised half maps (within the
    window) under the mask, corrected by phase randomisation (refine_solvent_corrected_fsc). Reconstructions run
    ``gridding_iterations`` (reconstruct) with their transforms on ``devices``. ``settle()``, if given, runs between
    the FSC and the reconstructions (a test hook: a run killed there has its earlier outputs complete)."""
    box = bps[0].box
    kw: dict[str, Any] = {"gridding_iterations": gridding_iterations, "devices": devices}
    if final or solvent_mask is not None:
        unfiltered = [reconstruct(bp, max_shell=window_shell, particles=n, **kw) for bp, n in zip(bps, particles)]
    if solvent_mask is not None:
        fsc = refine_solvent_corrected_fsc(unfiltered[0], unfiltered[1], solvent_mask, window_shell).cpu()
    elif final:
        fsc = fsc_curve(unfiltered[0], unfiltered[1]).cpu()
    else:
        fsc = halves_fsc(bps[0], bps[1], window_shell).cpu()
    if settle is not None:
        settle()
    resolution_shell = resolution_from_data_vs_prior(fsc_to_ssnr(fsc, tau2_fudge, whole=final), box)
    if final:
        joined = BackProjector(bps[0].data + bps[1].data, bps[0].weight + bps[1].weight, box, bps[0].pad)
        final_map, tau2 = reconstruct_gold_standard(joined, fsc, tau2_fudge, whole=True, particles=sum(particles), **kw)
        joined_completeness = fourier_completeness(joined, tau2, tau2_fudge, box // 2 + 1).cpu()
        return HalfSetMaps(
            fsc,
            resolution_shell,
            [tau2.cpu()],
            [joined_completeness],
            final_map=final_map.cpu(),
            unfiltered=[u.cpu() for u in unfiltered],
        )
    made = [
        reconstruct_gold_standard(bp, fsc, tau2_fudge, max_shell=window_shell, particles=n, **kw)
        for bp, n in zip(bps, particles)
    ]
    complete = [
        fourier_completeness(bp, t, tau2_fudge, box // 2 + 1, window_shell).cpu() for bp, (_, t) in zip(bps, made)
    ]
    return HalfSetMaps(fsc, resolution_shell, [t.cpu() for _, t in made], complete, references=[m for m, _ in made])


@dataclass(frozen=True)
class ClassMaps:
    """Classification's M-step: per class its map (on the accumulators' device), resolution shell, data-to-prior ratio
    per shell (RELION's data_vs_prior_class, model.star's rlnSsnrMap) and Fourier completeness per shell (CPU)."""

    maps: list[torch.Tensor]
    shells: list[int]
    ssnr: list[torch.Tensor]
    completeness: list[torch.Tensor]


def maximize_classes(
    bps: list[BackProjector],
    particles: list[float],
    class_tau2: list[torch.Tensor],
    tau2_fudge: float,
    window_shell: int,
    gridding_iterations: int,
    settle=None,
    devices: SlabDevices = SAME_DEVICE,
) -> ClassMaps:
    """Classification's M-step of K (symmetrised) classes: each map regularised by its τ² (from the power of the
    reference it was aligned to) × T, and its resolution (RELION: one shell inside the first where the data-to-prior
    ratio drops below 1, at least the first regularised shell), their transforms on ``devices``. ``settle()``, if
    given, runs after the first class's reconstruction (the kill tests' M-step point)."""
    n_shells = bps[0].box // 2 + 1
    out = ClassMaps([], [], [], [])
    for bp, n, tau2 in zip(bps, particles, class_tau2):
        out.maps.append(
            reconstruct(
                bp,
                tau2,
                tau2_fudge,
                window_shell,
                gridding_iterations=gridding_iterations,
                particles=max(n, 1e-6),
                devices=devices,
            )
        )
        ratio = data_vs_prior(bp, tau2, tau2_fudge, n_shells, window_shell).cpu()
        out.ssnr.append(ratio)
        out.completeness.append(fourier_completeness(bp, tau2, tau2_fudge, n_shells, window_shell).cpu())
        below = (ratio[1:] < 1).nonzero()
        out.shells.append(max(MIN_REGULARISED_SHELL, int(below[0, 0]) if below.numel() else n_shells - 1))
        if settle is not None and len(out.maps) == 1:
            settle()
    return out
