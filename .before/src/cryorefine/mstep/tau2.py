"""The prior's power τ² per shell: from the half-set FSC (auto-refine) or from the map's power (classification)."""

from __future__ import annotations

import torch

from ..fourier.grids import centred_half_radius, shell_sum
from ..projection.extract import PaddedTransform
from ..projection.insert import BackProjector
from ..reconstruction.fsc import fsc_to_ssnr
from ..reconstruction.reconstruct import reconstruct, reconstruction_noise_power


def tau2_from_fsc(
    fsc: torch.Tensor, bp: BackProjector, tau2_fudge: float = 1.0, whole: bool = False, max_shell: int | None = None
) -> torch.Tensor:
    """τ² = T·SSNR·σ² (RELION's update_tau2_with_fsc): SSNR from the half-set FSC (``whole`` for the map of both
    halves), σ² the reconstruction's noise power 1/⟨pad³·weight⟩ within ``max_shell``."""
    sigma2 = reconstruction_noise_power(bp, fsc.numel(), max_shell)
    return fsc_to_ssnr(fsc.to(sigma2), tau2_fudge, whole) * sigma2


def reconstruct_gold_standard(
    bp: BackProjector,
    fsc: torch.Tensor,
    tau2_fudge: float = 1.0,
    whole: bool = False,
    max_shell: int | None = None,
    **reconstruct_kw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Auto-refine's regularised map from a half set's accumulators (``whole``: the final map of both): (map (d, d, d),
    τ² (s,)). As RELION's maximization, T enters twice: in τ² = T·SSNR·σ² (updateSSNRarrays) and again in the
    regulariser 1/(pad³·T·τ²) (reconstruct), so --tau2_fudge 2 weakens the prior 4-fold (classification: once).
    ``reconstruct_kw``: reconstruct's gridding_iterations and particles."""
    tau2 = tau2_from_fsc(fsc, bp, tau2_fudge, whole, max_shell)
    return reconstruct(bp, tau2.to(bp.weight.device), tau2_fudge, max_shell=max_shell, **reconstruct_kw), tau2


def tau2_from_reference(ref: PaddedTransform, max_shell: int) -> torch.Tensor:
    """τ² of a class for its next reconstruction (classification), (d//2 + 1,): half the mean power |F|²/2 per shell
    of the padded, gridding pre-corrected transform the E-step projects (RELION computes it where it prepares each
    reference, from the solvent-flattened map); the shell of a padded voxel is round(R/pad), voxels with
    R <= max_shell·pad count, shells beyond are 0. Against the unpadded map's power this is ~1.1-1.6 times larger
    at mid and high resolution (the gridding pre-correction), a weaker prior (tests/relion/test_relion_class3d.py)."""
    R, c, n = int(round(max_shell * ref.pad)), ref.size // 2, ref.box // 2 + 1
    lo, hi = max(0, c - R), min(ref.size, c + R + 1)
    f = ref.f_padded[lo:hi, lo:hi, : R + 1]  # the cube around the origin that holds the sphere: not the whole grid
    r_pad = centred_half_radius(torch.arange(lo, hi, device=f.device) - c, f.shape[2])
    shell = torch.round(r_pad / ref.pad).long()
    keep = (r_pad <= R) & (shell < n)
    s = shell[keep]
    p, count = shell_sum(f[keep].abs() ** 2, s, n), shell_sum(torch.ones(s.shape, device=f.device), s, n)
    return torch.where(count > 0, p / count.clamp(min=1) / 2.0, torch.zeros_like(p))
