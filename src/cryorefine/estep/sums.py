"""Accumulators of one iteration (RELION's wsum_model): back-projectors, σ², scale, offsets, class and direction
weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..projection.insert import BackProjector
from .memory import available_bytes
from .slots import class_bounds


@dataclass(frozen=True)
class ScaleShells:
    """Which shells of each class enter the scale's sums: RELION's storeWeightedSums takes a sample's XA and AA only
    where its class's data_vs_prior (of the model the E-step aligns to) exceeds 3."""

    take: torch.Tensor  # (K, S) 1 where class k's shell enters, else 0 (compute device, float32)
    common: torch.Tensor  # (S,) 1 where every class's shell enters
    band: tuple[int, int]  # first and last shell where the classes differ (host); (1, 0) where they never do

    @classmethod
    def of(cls, take: torch.Tensor, device=None) -> "ScaleShells":
        """From ``take`` (K, S) bool."""
        t = take.bool().cpu()
        differ = torch.nonzero(t.any(0) & ~t.all(0)).flatten()
        band = (int(differ[0]), int(differ[-1])) if differ.numel() else (1, 0)
        f = t.to(device=device, dtype=torch.float32)
        return cls(f, f.min(0).values, band)


_STATS = (  # WeightedSums's accumulators other than the back-projectors, in its field order
    "sigma2_noise",
    "sigma2_count",
    "scale_xa",
    "scale_aa",
    "class_weight",
    "direction_weight",
    "offset_sq_angst2",
    "offset_weight",
)


@dataclass
class WeightedSums:
    backprojectors: list  # (K,) BackProjector per class (per half set in auto-refine)
    sigma2_noise: torch.Tensor  # (G, S) Σ Γ |X − sCP|² per group and shell (float64)
    sigma2_count: torch.Tensor  # (G, S) number of pixel terms (×Γ) per group and shell
    scale_xa: torch.Tensor  # (Gm, S) Σ Γ Re(X conj(CP)) per micrograph group and shell (RELION's XA without the scale)
    scale_aa: torch.Tensor  # (Gm, S) Σ Γ C²|P|²
    class_weight: torch.Tensor  # (K,)
    direction_weight: torch.Tensor  # (K, D)
    offset_sq_angst2: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    offset_weight: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    scale_shells: ScaleShells | None = None  # the shells XA and AA take (None: every shell of every class)

    @classmethod
    def zeros(
        cls,
        n_classes: int,
        box: int,
        pad: int,
        n_groups: int,
        n_directions: int,
        device=None,
        dtype=torch.float32,
        n_shells: int | None = None,
        n_scale_groups: int = 1,
        scale_shells: ScaleShells | None = None,
        grid_size: int | None = None,
    ):
        """Zeroed sums for maps of ``box``, back-projectors of ``grid_size`` (BackProjector.zeros); σ² (per optics
        group) and scale (per micrograph group, over ``scale_shells``) over ``n_shells`` (the largest optics group's
        d//2+1, default the map's)."""
        s = box // 2 + 1 if n_shells is None else n_shells
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            [BackProjector.zeros(box, pad, device, dtype, grid_size) for _ in range(n_classes)],
            z(n_groups, s),
            z(n_groups, s),
            z(n_scale_groups, s),
            z(n_scale_groups, s),
            z(n_classes),
            z(n_classes, n_directions),
            z(()),
            z(()),
            scale_shells,
        )

    def empty_stats(self) -> "WeightedSums":
        """Zeroed accumulators like these, without back-projectors (a tile's statistics, added when it has finished)."""
        zeros: dict[str, Any] = {k: torch.zeros_like(getattr(self, k)) for k in _STATS}
        return replace(self, backprojectors=[], **zeros)

    def stats_tensors(self) -> list[torch.Tensor]:
        """The accumulators other than the back-projectors, in the dataclass's field order."""
        return [getattr(self, k) for k in _STATS]

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulator as a tensor, in a fixed order (for all-reduce across ranks)."""
        out = []
        for bp in self.backprojectors:
            out += [torch.view_as_real(bp.data), bp.weight]
        return out + self.stats_tensors()


@dataclass
class TileSums:
    """One E-step tile's contribution, kept apart until the tile has finished (a tile that runs out of memory is
    retried from scratch, so nothing of it may have reached the run's sums)."""

    stats: WeightedSums  # without back-projectors
    rotations: torch.Tensor  # (r, 3, 3) fine rotations of the tile's union
    classes: torch.Tensor  # (r,) their class
    values: torch.Tensor  # (r, J) complex: Σ Γ s C X̃ / σ² per rotation
    weights: torch.Tensor  # (r, J): Σ Γ s² C² / σ² per rotation
    mass: torch.Tensor  # (r,): Σ Γ per rotation, the posterior probability the tile's particles give it

    @classmethod
    def zeros(
        cls, sums: WeightedSums, rotations: torch.Tensor, classes: torch.Tensor, n_pixels: int, dtype
    ) -> "TileSums":
        """Empty sums of a tile over ``rotations`` (r, 3, 3) of ``classes`` (r,), like ``sums``."""
        r, dev = rotations.shape[0], rotations.device
        return cls(
            sums.empty_stats(),
            rotations,
            classes,
            torch.zeros(r, n_pixels, dtype=dtype, device=dev),
            torch.zeros(r, n_pixels, device=dev),
            torch.zeros(r, device=dev),
        )

    def add_to(self, sums: WeightedSums, ky: torch.Tensor, kx: torch.Tensor) -> None:
        """Insert the slices (at window pixels (kx, ky) (J,)) of rotations with any posterior weight (the E-step
        leaves negligible samples out: weights.negligible_dropped), and add the statistics."""
        K = len(sums.backprojectors)
        # the used rotations of each class as a run: those without weight sorted after the last class (stable: in
        # their order), the runs' bounds read at once
        key = torch.where(self.mass > 0, self.classes, K)
        order = torch.argsort(key, stable=True)
        bounds = class_bounds(key[order], K)
        spare = available_bytes(self.values.device) or 0  # the tile's temporaries are gone: room for faster insertion
        for k, bp in enumerate(sums.backprojectors):
            if bounds[k + 1] > bounds[k]:
                rows = order[bounds[k] : bounds[k + 1]]
                bp.insert(self.rotations[rows], ky, kx, self.values[rows], self.weights[rows], spare)
        for a, b in zip(sums.stats_tensors(), self.stats.stats_tensors()):
            a += b
