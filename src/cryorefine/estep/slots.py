"""The fine pass's bookkeeping: which (class, coarse rotation) pairs a tile's particles expand, and in which groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FineSlots:
    """The fine pass's rotations: the union G of the tile's significant (class, coarse rotation) pairs (sorted by
    class, then rotation), and each particle's own pairs as slots into it, padded to the largest count Ls; with what
    the host needs to plan the pass (read from the device at once)."""

    g_class: torch.Tensor  # (G,) ascending
    g_coarse: torch.Tensor  # (G,) coarse rotation ids
    slot_g: torch.Tensor  # (n, Ls) index into G (padding: 0)
    slot_prior: torch.Tensor  # (n, Ls) log prior of the slot's coarse rotation (padding: −inf)
    allowed: torch.Tensor  # (n, T, Ls) bool: (coarse translation, slot) was significant
    counts: torch.Tensor  # (n,) slots in use per particle (the first counts[i] of its row)
    class_bounds: list[int]  # K + 1: class k's pairs are G's run class_bounds[k] .. class_bounds[k + 1] − 1
    by_count: torch.Tensor  # (n,) the particles ordered by their slot count
    sorted_counts: np.ndarray  # (n,) counts[by_count], on the host


def _runs(sorted_keys: torch.Tensor) -> torch.Tensor:
    """(M,) for ascending keys: the index of each key's run, i.e. of its value among the distinct values (the
    inverse of torch.unique, without reading how many there are)."""
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.cumsum(new, 0).sub_(1)


def _in_input_order(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``values`` given for the sorted order ``perm`` back in the input's order."""
    return torch.empty_like(values).scatter_(0, perm, values)


def fine_slots(mask: torch.Tensor, total: int, rot_prior: torch.Tensor, local_prior, n_rotations: int) -> FineSlots:
    """From the significant mask (n, K, T, L) with ``total`` true entries and the rotation log prior (n, K, L) to the
    fine pass's slots. The sizes the host needs (G, Ls, the class runs, the particles' slot counts) come in one read
    of the device; the rest is built where the mask is (torch.unique would wait for the device twice more)."""
    n, K, T, _ = mask.shape
    dev = mask.device
    # significant: particle, class, translation, rotation slot (nonzero of known size: no wait for the device)
    i_idx, k_idx, t_idx, l_idx = torch.nonzero_static(mask, size=total).unbind(1)
    coarse_id = l_idx if local_prior is None else local_prior[0][i_idx, l_idx]
    R, KR = n_rotations, K * n_rotations
    # the (class, coarse rotation) pairs ascending in class, then rotation; their union G by one sort. The M-sized
    # temporaries go as soon as they are used: with flat posteriors M is every coarse sample
    sorted_key, perm = torch.sort(k_idx * R + coarse_id)
    g_run = _runs(sorted_key)
    g_of_sig = _in_input_order(g_run, perm)  # index into the union G of each significant sample
    del perm
    below = torch.searchsorted(sorted_key, torch.arange(K + 1, device=dev) * R)  # class k's keys start at k·R
    bounds = torch.cat([g_run.new_zeros(1), g_run + 1])[below]  # the distinct keys below each class's first
    del sorted_key, g_run
    # each particle's distinct pairs, ascending (particle-major keys): its slots
    sorted_pair, pair_perm = torch.sort(i_idx * KR + k_idx * R + coarse_id)
    pair_run = _runs(sorted_pair)
    # distinct pairs up to each particle's last sample, the particle's slots the difference from the one before
    ends = torch.searchsorted(sorted_pair, torch.arange(1, n + 1, device=dev) * KR)
    upto = torch.where(ends > 0, pair_run[(ends - 1).clamp(min=0)] + 1, 0)
    del sorted_pair
    counts = torch.diff(upto, prepend=upto.new_zeros(1))
    slot = _in_input_order(pair_run, pair_perm).sub_((upto - counts)[i_idx])  # each sample's slot in its row
    del pair_run, pair_perm
    by_count = torch.argsort(counts)
    host = torch.cat([bounds, counts.max().reshape(1), counts[by_count]]).tolist()  # the one wait for the device
    class_run, Ls, sorted_counts = host[: K + 1], host[K + 1], np.asarray(host[K + 2 :], dtype=np.int64)
    gkeys = torch.zeros(class_run[-1], dtype=torch.long, device=dev).scatter_(0, g_of_sig, k_idx * R + coarse_id)
    slot_g = torch.zeros(n, Ls, dtype=torch.long, device=dev)
    slot_g[i_idx, slot] = g_of_sig
    slot_prior = torch.full((n, Ls), -torch.inf, device=dev)
    slot_prior[i_idx, slot] = rot_prior[i_idx, k_idx, l_idx]
    allowed = torch.zeros(n, T, Ls, dtype=torch.bool, device=dev)
    allowed.index_put_((i_idx, t_idx, slot), torch.ones((), dtype=torch.bool, device=dev))  # a host True would wait
    return FineSlots(gkeys // R, gkeys % R, slot_g, slot_prior, allowed, counts, class_run, by_count, sorted_counts)


def class_bounds(sorted_classes: torch.Tensor, n_classes: int) -> list[int]:
    """Where each class's run begins in ``sorted_classes`` (ascending class ids), and where the last ends: K + 1
    offsets, read from the device at once (one wait for the host whatever K; a mask and a test per class were three)."""
    k = torch.arange(n_classes + 1, device=sorted_classes.device, dtype=sorted_classes.dtype)
    return torch.searchsorted(sorted_classes, k).tolist()


def slot_groups(slots: FineSlots, rows_for) -> list[tuple[torch.Tensor, int]]:
    """The fine pass's particle groups: (rows, slots), particles ordered by their slot count, a group's largest count
    at most twice its smallest (or 4), and at most rows_for(that limit) rows (the memory budget), so that padding to
    the group's largest count wastes little. (Padded to the tile's largest count, a few particles with broad
    posteriors made every particle's products and accumulations several times larger.)"""
    order, sorted_counts = slots.by_count, slots.sorted_counts
    groups, g0, n = [], 0, len(sorted_counts)
    while g0 < n:
        limit = max(4, 2 * int(sorted_counts[g0]))
        g1 = min(int(np.searchsorted(sorted_counts, limit, side="right")), g0 + rows_for(limit), n)
        g1 = max(g1, g0 + 1)
        groups.append((order[g0:g1], max(1, int(sorted_counts[g1 - 1]))))
        g0 = g1
    return groups
