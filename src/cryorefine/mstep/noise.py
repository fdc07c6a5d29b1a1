"""Noise spectra σ² per noise group and shell (per real/imaginary component), RELION's sigma2_noise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from ..fourier.filters import soft_mask_outside_map
from ..fourier.grids import rfft2_centered, shell_index_2d
from ..io.prefetch import read_ahead
from ..io.table import ParticleTable, read_images
from ..transfer import to_device


IMAGE_BATCH_BYTES = 64 << 20  # float32 images per batch of the initial spectra (256 of 256 px)


@dataclass(frozen=True)
class SpectrumReads:
    """Where initial_sigma2's images come from and which of them this process reads: ``load(rows)`` reads the raw
    images of ``rows`` on the host, one batch ahead on a thread of its own (the next batch is read from the stacks
    while the device takes this one: one after the other they took ~1 s of a 5,000-image start at 256 px), and
    ``put(rows, loaded, box)`` gives them (len(rows), box, box) float32 on the device (a run's GPU image cache, which
    then keeps them for the first iteration: ImageCache.load and .images). None: read_images from the stacks, and a
    copy to the device. Of several processes (``rank`` of ``ranks``) each reads every ranks-th batch, and
    ``combine(tensors)`` sums their partial sums over the processes in place (an all-reduce)."""

    load: Callable[[np.ndarray], Any] | None = None
    put: Callable[[np.ndarray, Any, int], torch.Tensor] | None = None
    rank: int = 0
    ranks: int = 1
    combine: Callable[[list[torch.Tensor]], None] | None = None


def initial_sigma2(
    table: ParticleTable,
    n_groups: int,
    subset: np.ndarray | None = None,
    batch: int | None = None,
    device=None,
    mask_radius_angst: float | None = None,
    mask_edge_px: float = 5.0,
    reads: SpectrumReads = SpectrumReads(),
) -> torch.Tensor:
    """(H, G, S) σ² from the images, RELION's start (calculateSumOfPowerSpectraAndAverageImage): per subset h
    (``subset`` (n,) labels 0..H−1, e.g. the half sets; None: one subset of all particles) and group, the mean power
    per shell of that subset's images, minus the power of the average image of all the group's particles, halved (per
    real/imaginary component). Each group's σ² is in its own images' shells (S: the largest box's d//2+1; a smaller
    box's row ends at its Nyquist, the rest is its last value). Every image is read, as RELION does; the pixels past
    Nyquist (the corners) count in no shell. The images are under the soft circular particle mask of
    ``mask_radius_angst`` if given (RELION masks them only with --zero_mask, as its E-step does); ``reads``: how the
    images are read (SpectrumReads; by default all of them here, from the stacks), ``batch`` images at a time
    (default: IMAGE_BATCH_BYTES of them)."""
    labels = np.zeros(len(table), dtype=np.int64) if subset is None else np.asarray(subset, dtype=np.int64)
    H = int(labels.max()) + 1 if len(labels) else 1
    S = max(o.box for o in table.optics) // 2 + 1
    sigma2 = torch.zeros(H, n_groups, S, dtype=torch.float64, device=device)
    count = torch.zeros(H, n_groups, dtype=torch.float64, device=device)
    for g, optics in enumerate(table.optics[:n_groups]):
        rows = np.flatnonzero(table.optics_group == g)
        radius = None if mask_radius_angst is None else mask_radius_angst / optics.angpix
        power, n, mean_power = _group_power(
            table, rows, labels[rows], H, optics.box, batch, device, radius, mask_edge_px, reads
        )
        s = optics.box // 2 + 1
        sigma2[:, g, :s] = (power / n.clamp(min=1)[:, None] - mean_power) / 2.0
        sigma2[:, g, s:] = sigma2[:, g, s - 1 : s]
        count[:, g] = n
    # a group without particles in a subset takes the average of that subset's others
    empty = count == 0
    for h in range(H):
        if empty[h].any() and not empty[h].all():
            sigma2[h, empty[h]] = sigma2[h, ~empty[h]].mean(0)
    return sigma2.clamp(min=1e-12)


def _group_power(
    table: ParticleTable,
    rows: np.ndarray,
    labels: np.ndarray,
    H: int,
    box: int,
    batch: int | None,
    device,
    mask_radius_px: float | None,
    mask_edge_px: float,
    reads: SpectrumReads,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optics group's images ``rows`` (one ``box``): (Σ power per pixel of each shell (H, d//2+1) per subset,
    images per subset (H,), the power of their average image per pixel of each shell (d//2+1,))."""
    S = box // 2 + 1
    shells = shell_index_2d(box, device).flatten()
    inside = shells < S
    shells_in = shells[inside]
    npix = (
        torch.zeros(S, dtype=torch.float64, device=device)
        .index_add_(0, shells_in, torch.ones_like(shells_in, dtype=torch.float64))
        .clamp(min=1)
    )
    power = torch.zeros(H, S, dtype=torch.float64, device=device)
    mean = torch.zeros(int(inside.sum()), dtype=torch.complex128, device=device)
    batch = batch or max(1, IMAGE_BATCH_BYTES // (4 * box * box))
    load = partial(read_images, table) if reads.load is None else reads.load
    put = reads.put or (lambda rows, host, box: to_device(host, device))
    starts = range(reads.rank * batch, len(rows), reads.ranks * batch)  # this process's share of the batches
    for s0, loaded in read_ahead(lambda s0: load(rows[s0 : s0 + batch]), starts):
        these = rows[s0 : s0 + batch]
        imgs = put(these, loaded, box)
        if mask_radius_px is not None:
            imgs = soft_mask_outside_map(imgs, mask_radius_px, mask_edge_px, ndim=2)
        f = rfft2_centered(imgs).flatten(1)[:, inside].to(torch.complex128)
        p = torch.zeros(len(these), S, dtype=torch.float64, device=device).index_add_(1, shells_in, f.abs() ** 2)
        power.index_add_(0, torch.as_tensor(labels[s0 : s0 + batch], device=device), p)
        mean += f.sum(0)
    if reads.combine is not None:
        reads.combine([power, torch.view_as_real(mean)])
    n = torch.as_tensor(np.bincount(labels, minlength=H), dtype=torch.float64, device=device)
    mean = mean / max(1, len(rows))
    mean_power = torch.zeros(S, dtype=torch.float64, device=device).index_add_(0, shells_in, mean.abs() ** 2)
    return power / npix, n, mean_power / npix


def update_sigma2(old: torch.Tensor, wsum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """σ² = Σ Γ|X − sCP|² / (2 · count) where there were data (every shell up to Nyquist: beyond the E-step window the
    images' own power, estep.store.add_power_beyond_window); elsewhere the previous value."""
    new = wsum / (2.0 * count.clamp(min=1))
    return torch.where(count > 0, new, old).clamp(min=1e-12)


def on_map_shells(spectrum, group_box: int, group_angpix: float, box: int, angpix: float):
    """(box//2+1,) an optics group's spectrum (numpy or torch, in its own images' shells, of ``group_box`` px of
    ``group_angpix`` Å) on the shells of the map (``box`` px of ``angpix``), where RELION reads it (its image shell i
    takes the map's shell round(i · map length / group length)): each map shell takes the group's nearest, at most
    its Nyquist."""
    if group_box == box and group_angpix == angpix:
        return spectrum[: box // 2 + 1]
    to_group = group_box * group_angpix / (box * angpix)
    nearest = np.minimum(np.round(np.arange(box // 2 + 1) * to_group).astype(np.int64), group_box // 2)
    return spectrum[nearest]
