"""The significant set (adaptive oversampling) against a float64 sort-and-sum reference, peaked and flat posteriors."""

import numpy as np
import pytest
import torch

from cryorefine.estep.weights import TOPK_SIGNIFICANT, significant_mask


def reference(logits: np.ndarray, fraction: float, maxsig: int):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    counts = []
    for row in p:
        c = int(np.searchsorted(np.cumsum(np.sort(row)[::-1]), fraction) + 1)
        counts.append(min(c, len(row), maxsig) if maxsig > 0 else min(c, len(row)))
    return np.array(counts)


@pytest.mark.parametrize("maxsig", [0, 7])
def test_significant_set_matches_a_full_sort(maxsig):
    rng = np.random.default_rng(2)
    S = 20000
    # sharpness from a single dominant sample to nearly flat: the flat rows need more than the top-k samples
    scales = np.array([300.0, 60.0, 20.0, 8.0, 3.0, 1.0, 0.3, 0.05])
    logits = rng.standard_normal((len(scales), S)) * scales[:, None]
    mask, count, _ = significant_mask(torch.from_numpy(logits).float(), 0.999, maxsig)
    ref = reference(logits, 0.999, maxsig)
    assert (count.numpy() == ref).all() or np.abs(
        count.numpy() - ref
    ).max() <= 1  # float32 sums may move the edge by one
    if maxsig == 0:
        assert ref.max() > TOPK_SIGNIFICANT and ref.min() < TOPK_SIGNIFICANT  # both paths are exercised
    # the mask holds the count largest samples
    for i in range(len(scales)):
        kept = np.flatnonzero(mask[i].numpy())
        assert len(kept) >= count[i]
        assert logits[i, kept].min() >= np.sort(logits[i])[::-1][count[i] - 1] - 1e-4


@pytest.mark.parametrize("rows", [slice(0, 3), slice(None)])  # peaked rows only (top-k path); with the flat ones
def test_the_counted_total_is_the_masks(rows):
    rng = np.random.default_rng(3)
    scales = np.array([300.0, 60.0, 20.0, 1.0, 0.05])[rows]
    logits = torch.from_numpy(rng.standard_normal((len(scales), 20000)) * scales[:, None]).float()
    plain = significant_mask(logits, 0.999, 0)
    counted = significant_mask(logits, 0.999, 0, counted=True)
    assert torch.equal(plain.mask, counted.mask) and torch.equal(plain.nsig, counted.nsig)
    assert plain.total is None and counted.total == int(plain.mask.sum())


@pytest.mark.parametrize("k", [1, 5, 256])
def test_top_values_by_blocks_are_topk(k):
    """weights.top_values against torch.topk on long rows (the block path): the same values in the same order, with
    ties (repeated values, zeros of underflowed posteriors) and the largest values packed into a few blocks."""
    from cryorefine.estep.weights import TOPK_BLOCK, top_values

    g = torch.Generator().manual_seed(4)
    S = 4 * 256 * TOPK_BLOCK * 2
    p = torch.softmax(torch.randn(6, S, generator=g) * torch.tensor([0.1, 1, 5, 30, 300, 3])[:, None], 1)
    p[5] = torch.round(p[5] * 1e6) / 1e6  # many ties
    p[4, : S // 2] = 0.0  # half the row underflowed
    p[3, 100 : 100 + 3 * TOPK_BLOCK] += 1.0  # the largest values in three neighbouring blocks
    assert torch.equal(top_values(p, k), torch.topk(p, k, dim=1).values)


def _posteriors(S: int = 20000) -> torch.Tensor:
    """Rows from one dominant sample to flat (beyond the top-k: the sort path's full sorts), half a row underflowed
    to zeros, a row of ties."""
    g = torch.Generator().manual_seed(6)
    scales = torch.tensor([300.0, 60.0, 20.0, 8.0, 3.0, 1.0, 0.3, 0.05, 0.0, 5.0])
    p = torch.softmax(torch.randn(len(scales), S, generator=g) * scales[:, None], 1)
    p[4, : S // 2] = 0.0
    p[9] = torch.round(p[9] * 1e5) / 1e5
    return p / p.sum(1, keepdim=True)


@pytest.mark.parametrize("fraction", [0.999, 0.9, 0.5])
def test_the_radix_threshold_gives_the_sorted_set(fraction, monkeypatch):
    """weights.set_threshold (no sort, no wait for the device) against the sort path's set, in chunks of rows too."""
    from cryorefine.estep import weights

    p = _posteriors()
    expected = weights.significant_set(p, fraction, 0)
    assert expected.nsig.max() > TOPK_SIGNIFICANT and expected.nsig.min() == 1  # both of its paths
    assert torch.equal(p >= weights.set_threshold(p, fraction)[:, None], expected.mask)
    monkeypatch.setattr(weights, "RADIX_CHUNK_SAMPLES", 3 * p.shape[1])  # chunks of 3 rows, the last of 1
    assert torch.equal(p >= weights.set_threshold(p, fraction)[:, None], expected.mask)


def test_the_radix_threshold_at_exact_sums_short_mass_and_no_fraction():
    """Sums that reach the fraction exactly (binary fractions: a set ends where the mass equals it), a row holding less
    than the fraction (every sample), a fraction of 0 (the largest sample alone), no rows."""
    from cryorefine.estep.weights import set_threshold, significant_set

    p = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.5, 0.125, 0.25], [0.3, 0.2, 0.1, 0.0]])
    for fraction in (0.5, 0.75, 0.875, 0.999, 0.0):
        expected = significant_set(p, fraction, 0).mask
        assert torch.equal(p >= set_threshold(p, fraction)[:, None], expected), fraction
    assert (p[2] >= set_threshold(p, 0.999)[2]).all()  # 0.6 of the mass: every sample
    assert set_threshold(p[:0], 0.999).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_negligible_samples_dropped_as_on_the_cpu():
    """negligible_dropped on a GPU (the radix threshold) against the CPU (top-k and sorts)."""
    from cryorefine.estep.weights import negligible_dropped

    p = _posteriors()
    assert torch.equal(negligible_dropped(p.cuda(), 0.999).cpu(), negligible_dropped(p, 0.999))


def block_summaries(logits: torch.Tensor):
    """Each TOPK_BLOCK block's largest logit and Σ exp(logit − largest), in float64 (coarse_epilogue's, exactly)."""
    from cryorefine.estep.weights import TOPK_BLOCK

    blocks = logits.double().view(logits.shape[0], -1, TOPK_BLOCK)
    largest = blocks.amax(2)
    return largest.float(), torch.exp(blocks - largest[..., None]).sum(2).float()


@pytest.mark.parametrize("maxsig", [0, 7])
def test_the_set_from_block_summaries_matches_a_full_sort(maxsig):
    """significant_from_blocks (the set of a global search's coarse scores on a GPU) against the float64 sort, rows from
    one dominant sample to nearly flat (beyond the top k: the rows then go through significant_mask), and its total."""
    from cryorefine.estep.weights import significant_from_blocks

    rng = np.random.default_rng(5)
    scales = np.array([300.0, 60.0, 20.0, 8.0, 3.0, 1.0, 0.3, 0.05])
    logits = rng.standard_normal((len(scales), 64 * 320)) * scales[:, None] - 20000.0  # scores far from 0, as diff2 is
    t = torch.from_numpy(logits).float()
    got = significant_from_blocks(t, *block_summaries(t), 0.999, maxsig)
    ref = reference(logits, 0.999, maxsig)
    plain = significant_mask(t, 0.999, maxsig)
    ranked = ref <= TOPK_SIGNIFICANT
    if maxsig == 0:
        assert ranked.any() and not ranked.all()  # both paths are exercised
    # rows ranked from the blocks: the float64 sort's count, up to float32 sums moving the edge by one; the others
    # are significant_mask's rows
    assert np.abs(got.nsig.numpy() - ref)[ranked].max() <= 1
    assert torch.equal(got.nsig[~ranked], plain.nsig[~ranked]) and torch.equal(got.mask[~ranked], plain.mask[~ranked])
    assert got.total == int(got.mask.sum())
    for i in np.flatnonzero(ranked):  # the count largest samples, and none below them
        kept = logits[i, got.mask[i].numpy()]
        assert len(kept) == got.nsig[i]
        assert kept.min() == np.sort(logits[i])[::-1][got.nsig[i] - 1]
    assert (got.mask != plain.mask).sum() <= ranked.sum()  # the softmax path's set, up to rounding at its edge
