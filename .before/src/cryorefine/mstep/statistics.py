"""The noise and prior statistics of one model (RELION's MlModel parts the E-step reads): σ², the micrograph groups'
intensity scales, the offset prior's variance and each class's data-to-prior ratio, with their M-step update.

σ² is per optics group (RELION ≥ 4's choice; 3.1 had one per micrograph group), the scale per micrograph group (as in
every RELION version: refine/groups.py). In auto-refine each half set has its own (RELION combines the weighted sums of
a half set's followers only), pooled in the final iteration, when RELION joins the halves; classification has one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..estep.sums import ScaleShells, WeightedSums
from ..fourier.grids import rfft3_centered, shell_index_3d, shell_sum
from .noise import update_sigma2


def _pooled(sums: list[WeightedSums], name: str) -> torch.Tensor:
    """The sum of one accumulator over ``sums``."""
    return torch.stack([getattr(s, name) for s in sums]).sum(0)


SCALE_MIN_SSNR = 3.0  # RELION's E-step takes a sample's scale products only where its class's data_vs_prior exceeds it
SCALE_MEDIAN_RANGE = 5.0  # RELION keeps the scales within [median / 5, 5 · median]


@dataclass(frozen=True)
class GroupScales:
    """RELION's scale_correction: one intensity scale per micrograph group; the E-step compares each image with
    scale · CTF · projection."""

    value: torch.Tensor  # (Gm,) float64, particle-weighted mean 1
    of_particle: np.ndarray  # (N,) int64 each particle's group (RelionGroups.of_particle)
    particles: torch.Tensor  # (Gm,) float64 this model's particles per group (RELION's nr_particles_per_group)

    @classmethod
    def ones(cls, of_particle: np.ndarray, in_model: np.ndarray, n_groups: int) -> "GroupScales":
        """Scales 1 for ``n_groups`` groups; ``in_model`` (N,) bool: the model's particles (a half set's)."""
        counts = np.bincount(of_particle[in_model], minlength=n_groups)
        return cls(torch.ones(n_groups, dtype=torch.float64), of_particle, torch.as_tensor(counts, dtype=torch.float64))

    def with_value(self, value: torch.Tensor) -> "GroupScales":
        return replace(self, value=torch.as_tensor(value, dtype=torch.float64))

    @classmethod
    def one_for_all(cls, n_particles: int) -> "GroupScales":
        """Scale 1 for ``n_particles`` all in one group."""
        return cls.ones(np.zeros(n_particles, np.int64), np.ones(n_particles, bool), 1)


@dataclass(frozen=True)
class ModelStatistics:
    sigma2: torch.Tensor  # (G, d//2+1) float64 noise power per optics group and shell (our unnormalised DFT's units)
    scale: GroupScales  # per micrograph group
    sigma2_offset_angst2: float  # variance of the Gaussian prior on origin offsets (Å²)
    data_vs_prior: torch.Tensor  # (K, d//2+1) float64 RELION's data_vs_prior_class of the last M-step (or initial)

    @classmethod
    def initial(
        cls, sigma2: torch.Tensor, sigma_offset_angst: float, scale: GroupScales, data_vs_prior: torch.Tensor
    ) -> "ModelStatistics":
        return cls(sigma2.cpu(), scale, sigma_offset_angst**2, data_vs_prior.cpu())


def upgraded(stats, of_particle: np.ndarray, in_model: np.ndarray, n_groups: int, n_classes: int) -> ModelStatistics:
    """``stats`` as this version keeps them: a checkpoint written before the scales were per micrograph group has a
    tensor of per-optics-group scales and no data-to-prior ratio; it continues with scales 1 for ``n_groups`` groups
    (``of_particle`` (N,), the model's particles ``in_model`` (N,) bool) and no shell in the next scale sums (RELION's
    data_vs_prior > 3 picks none), so one iteration later the scales are RELION's again."""
    if hasattr(stats, "data_vs_prior"):
        return stats
    zeros = torch.zeros(n_classes, stats.sigma2.shape[1], dtype=torch.float64)
    return ModelStatistics(
        stats.sigma2, GroupScales.ones(of_particle, in_model, n_groups), stats.sigma2_offset_angst2, zeros
    )


def map_shell_power(start: torch.Tensor) -> torch.Tensor:
    """RELION's getSpectrum of a map (d, d, d): the mean |F|² per shell (d//2+1,), float64 on the host; computed on
    the map's device."""
    d = start.shape[-1]
    S = d // 2 + 1
    shells = shell_index_3d(d, start.device)
    inside = shells < S
    s = shells[inside]
    power = shell_sum(rfft3_centered(start.double()).abs()[inside] ** 2, s, S)
    return (power / shell_sum(torch.ones_like(s, dtype=torch.float64), s, S).clamp(min=1)).cpu()


def initial_data_vs_prior(
    power: torch.Tensor, n_classes: int, sigma2: torch.Tensor, optics_particles: np.ndarray, tau2_fudge: float
) -> torch.Tensor:
    """RELION's initialiseDataVersusPrior (K, d//2+1) for the first E-step, of K classes from the (low-passed) start
    map's ``power`` per shell (d//2+1,) (map_shell_power), σ² (G, ≥ d//2+1) and the model's particles per optics group
    (G,): per shell i the evidence N·p(k)/⟨σ²⟩ (/2i for i > 0, its 3D-to-2D shell ratio) over the prior 1/τ²,
    τ² = T·⟨|F|²⟩/2 of the map (σ² and τ² in our unnormalised DFT's units: their ratio is RELION's), ⟨σ²⟩ the
    particle-weighted mean over the groups."""
    S = power.shape[0]
    n = torch.as_tensor(optics_particles, dtype=torch.float64)
    avg_sigma2 = (n[:, None] * sigma2[:, :S].double().cpu()).sum(0) / n.sum()
    i = torch.arange(S, dtype=torch.float64)
    evidence = n.sum() / n_classes / avg_sigma2 / torch.where(i > 0, 2.0 * i, 1.0)
    return (evidence * tau2_fudge * power / 2.0).expand(n_classes, S).clone()


def relion_group_scales(xa: torch.Tensor, aa: torch.Tensor, particles: torch.Tensor) -> torch.Tensor:
    """RELION's maximizationOtherParameters for the scales (Gm,) from each group's Σ XA and Σ AA (Gm,) over the
    E-step's selected shells (without the old scale: RELION divides it out): XA/AA (1 where AA = 0), each kept within
    [median/5, 5·median] (RELION's median: the sorted values' element Gm/2), then divided by their mean weighted by
    ``particles`` (Gm,)."""
    raw = torch.where(aa > 0, xa / torch.where(aa > 0, aa, 1.0), 1.0)
    median = torch.sort(raw).values[raw.numel() // 2]
    hi, lo = SCALE_MEDIAN_RANGE * median, median / SCALE_MEDIAN_RANGE
    kept = torch.where(raw > hi, hi, torch.where(raw < lo, lo, raw))
    return kept / ((particles * kept).sum() / particles.sum())


def scale_spread(scale: GroupScales) -> str:
    """run.log's line on the scales: their range and particle-weighted standard deviation about 1."""
    v, w = scale.value, scale.particles
    sd = float(((w * (v - 1.0) ** 2).sum() / w.sum()).sqrt())
    return (
        f"intensity scales of {v.numel()} micrograph groups: {float(v.min()):.3f} to {float(v.max()):.3f}, sd {sd:.3f}"
    )


def estep_scale_shells(stats: ModelStatistics, scale: bool, device=None) -> ScaleShells | None:
    """The shells of each class whose products enter the next E-step's scale sums (RELION: data_vs_prior > 3); None
    (every shell: the sums go unused) without ``scale`` (--scale) or with one micrograph group."""
    if not scale or stats.scale.value.numel() < 2:
        return None
    return ScaleShells.of(stats.data_vs_prior > SCALE_MIN_SSNR, device)


def updated_statistics(
    old: ModelStatistics,
    sums: list[WeightedSums],
    min_sigma2_offset_angst2: float,
    noise: bool = True,
    scale: bool = False,
) -> ModelStatistics:
    """The M-step of ``old`` from the pooled ``sums`` (one half set's, or both in the final iteration): σ² (unless
    ``noise`` is False: RELION keeps it after a --firstiter_cc iteration), the group scales with ``scale`` (--scale,
    several micrograph groups: RELION switches it off for one), and the offset prior's variance (at least
    ``min_sigma2_offset_angst2``). The data-to-prior ratio is the maps' M-step's (the caller's)."""
    sigma2, group_scale, sigma2_offset = old.sigma2, old.scale, old.sigma2_offset_angst2
    if noise:
        wsum = _pooled(sums, "sigma2_noise")
        sigma2 = update_sigma2(old.sigma2.to(wsum), wsum, _pooled(sums, "sigma2_count")).cpu()
    if scale and old.scale.value.numel() > 1:
        xa, aa = (_pooled(sums, name).sum(1).cpu() for name in ("scale_xa", "scale_aa"))
        group_scale = old.scale.with_value(relion_group_scales(xa, aa, old.scale.particles))
    off_w = float(_pooled(sums, "offset_weight"))
    if off_w > 0:
        sigma2_offset = max(float(_pooled(sums, "offset_sq_angst2")) / off_w, min_sigma2_offset_angst2)
    return replace(old, sigma2=sigma2, scale=group_scale, sigma2_offset_angst2=sigma2_offset)
