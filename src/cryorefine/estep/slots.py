"""The fine pass's bookkeeping: which (class, coarse rotation) pairs a tile's particles expand, and in which groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FineSlots:
    """The fine pass's rotations: the union G of the tile's significant (class, coarse rotation) pairs (sorted by
    class, then rotation), and each particle's own pairs as slots into it, padded to the largest count Ls."""

    g_class: torch.Tensor  # (G,) ascending
    g_coarse: torch.Tensor  # (G,) coarse rotation ids
    slot_g: torch.Tensor  # (n, Ls) index into G (padding: 0)
    slot_prior: torch.Tensor  # (n, Ls) log prior of the slot's coarse rotation (padding: −inf)
    allowed: torch.Tensor  # (n, T, Ls) bool: (coarse translation, slot) was significant
    counts: torch.Tensor  # (n,) slots in use per particle (the first counts[i] of its row)


def fine_slots(mask: torch.Tensor, rot_prior: torch.Tensor, local_prior, n_rotations: int) -> FineSlots:
    """From the significant mask (n, K, T, L) and the rotation log prior (n, K, L) to the fine pass's slots."""
    n, _, T, _ = mask.shape
    dev = mask.device
    i_idx, k_idx, t_idx, l_idx = torch.nonzero(mask).unbind(
        1
    )  # significant: particle, class, translation, rotation slot
    coarse_id = l_idx if local_prior is None else local_prior[0][i_idx, l_idx]
    R = n_rotations
    gkeys, g_of_sig = torch.unique(k_idx * R + coarse_id, return_inverse=True)  # union G; g_of_sig (M,)
    G = len(gkeys)
    pk, pk_inv = torch.unique(i_idx * G + g_of_sig, return_inverse=True)
    p_part, p_g = pk // G, pk % G
    counts = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, p_part, torch.ones_like(p_part))  # no wait
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(pk), device=dev) - starts[p_part]
    Ls = int(counts.max())
    slot_g = torch.zeros(n, Ls, dtype=torch.long, device=dev)
    slot_g[p_part, slot] = p_g
    slot_prior = torch.full((n, Ls), -torch.inf, device=dev)
    slot_prior[i_idx, slot[pk_inv]] = rot_prior[i_idx, k_idx, l_idx]
    allowed = torch.zeros(n, T, Ls, dtype=torch.bool, device=dev)
    allowed[i_idx, t_idx, slot[pk_inv]] = True
    return FineSlots(gkeys // R, gkeys % R, slot_g, slot_prior, allowed, counts)


def class_bounds(sorted_classes: torch.Tensor, n_classes: int) -> list[int]:
    """Where each class's run begins in ``sorted_classes`` (ascending class ids), and where the last ends: K + 1
    offsets, read from the device at once (one wait for the host whatever K; a mask and a test per class were three)."""
    k = torch.arange(n_classes + 1, device=sorted_classes.device, dtype=sorted_classes.dtype)
    return torch.searchsorted(sorted_classes, k).tolist()


def slot_groups(counts: torch.Tensor, rows_for) -> list[tuple[torch.Tensor, int]]:
    """The fine pass's particle groups: (rows, slots), particles ordered by their slot count, a group's largest count
    at most twice its smallest (or 4), and at most rows_for(that limit) rows (the memory budget), so that padding to
    the group's largest count wastes little. (Padded to the tile's largest count, a few particles with broad
    posteriors made every particle's products and accumulations several times larger.)"""
    order = torch.argsort(counts)
    sorted_counts = counts[order].cpu().numpy()
    groups, g0, n = [], 0, len(sorted_counts)
    while g0 < n:
        limit = max(4, 2 * int(sorted_counts[g0]))
        g1 = min(int(np.searchsorted(sorted_counts, limit, side="right")), g0 + rows_for(limit), n)
        g1 = max(g1, g0 + 1)
        groups.append((order[g0:g1], max(1, int(sorted_counts[g1 - 1]))))
        g0 = g1
    return groups
