"""The fine pass's slots against a plain loop over the significant samples, global and local searches, and the
particle groups' order against a sort of the counts."""

import numpy as np
import pytest
import torch

from cryorefine.estep.slots import fine_slots, slot_groups


def reference(mask: np.ndarray, rot_prior: np.ndarray, local_ids: np.ndarray | None, R: int):
    """The union G of (class, coarse rotation) pairs, ascending, and per particle its pairs' indices into G in
    ascending order with their priors and the significant translations of each."""
    n, K, T, L = mask.shape
    coarse = (lambda i, j: j) if local_ids is None else (lambda i, j: int(local_ids[i, j]))
    union = sorted({(k, coarse(i, j)) for i, k, _, j in zip(*np.nonzero(mask))})
    g_of = {pair: g for g, pair in enumerate(union)}
    rows = []
    for i in range(n):
        own = {}
        for k, t, j in zip(*np.nonzero(mask[i])):
            g = g_of[(k, coarse(i, j))]
            prior, ts = own.setdefault(g, (rot_prior[i, k, j], set()))
            ts.add(t)
        rows.append(sorted(own.items()))
    return union, rows


@pytest.mark.parametrize("local", [False, True])
def test_fine_slots_match_a_loop(local):
    rng = np.random.default_rng(5)
    n, K, T, L, R = 9, 3, 4, 12, 12
    mask = rng.random((n, K, T, L)) < rng.uniform(0.01, 0.2, (n, 1, 1, 1))
    mask[:, 1] = False  # a class without significant samples: an empty run
    mask[np.arange(n), rng.choice([0, 2], n), rng.integers(0, T, n), rng.integers(0, L, n)] = True  # one at least
    rot_prior = rng.standard_normal((n, K, L)).astype(np.float32)
    local_ids = np.stack([rng.permutation(40)[:L] for _ in range(n)]) if local else None
    R = 40 if local else R
    m = torch.from_numpy(mask)
    lp = None if local_ids is None else (torch.from_numpy(local_ids), None)
    s = fine_slots(m, int(m.sum()), torch.from_numpy(rot_prior), lp, R)

    union, rows = reference(mask, rot_prior, local_ids, R)
    assert list(zip(s.g_class.tolist(), s.g_coarse.tolist())) == union
    assert s.class_bounds == [sum(1 for k, _ in union if k < c) for c in range(K + 1)]
    assert s.class_bounds[1] == s.class_bounds[2]
    assert s.counts.tolist() == [len(r) for r in rows]
    assert s.slot_g.shape[1] == max(len(r) for r in rows)
    for i, row in enumerate(rows):
        c = len(row)
        assert s.slot_g[i, :c].tolist() == [g for g, _ in row]
        assert np.allclose(s.slot_prior[i, :c].numpy(), [p for _, (p, _) in row])
        assert torch.isinf(s.slot_prior[i, c:]).all()
        for j, (_, (_, ts)) in enumerate(row):
            assert set(np.flatnonzero(s.allowed[i, :, j].numpy())) == ts
        assert not s.allowed[i, :, c:].any()
    assert (s.sorted_counts == np.sort(s.counts.numpy())).all()
    assert (s.counts[s.by_count].numpy() == s.sorted_counts).all()
    groups = slot_groups(s, lambda limit: n)
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(n))  # every particle once
    for rows, width in groups:
        assert width == int(s.counts[rows].max())
