"""convertAllSquaredDifferencesToWeights: posteriors from the scores, and the significant samples of each pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .settings import EStepSettings


TOPK_SIGNIFICANT = 256  # samples ranked per particle before falling back to a full sort
TOPK_BLOCK = 64  # samples per block of top_values's first pass


def top_values(p: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk(p, k).values (the k largest of each row of p (n, S), descending; k <= S), by way of blocks of
    TOPK_BLOCK samples where the rows are long: each block's maximum (one pass over p), the k blocks with the largest
    maxima, then the k largest of their samples. The same values in the same order: an element among a row's k largest
    lies in a block whose maximum is at least as large, and at most k blocks have one (a larger element elsewhere would
    make k + 1 larger ones). Where the rows are short, or S has no such blocks, topk itself. A global search's rows
    are every coarse sample (~10^5-10^6), where a top-k select of the whole row was most of its significance step."""
    n, S = p.shape
    B = TOPK_BLOCK
    if S % B or S < 4 * k * B or not p.is_contiguous():
        return torch.topk(p, k, dim=1).values
    blocks = p.view(n, S // B, B)
    best = torch.topk(blocks.amax(2), k, dim=1).indices  # (n, k) the blocks with the k largest maxima
    candidates = blocks.gather(1, best[:, :, None].expand(n, k, B)).reshape(n, k * B)
    return torch.topk(candidates, k, dim=1).values


class SignificantSet(NamedTuple):
    """The smallest set of each row's samples that holds a fraction of its posterior mass."""

    mask: torch.Tensor  # (n, S) bool: the samples in the set (ties at the threshold included)
    nsig: torch.Tensor  # (n,) the set's size as RELION counts it (rlnNrOfSignificantSamples)
    total: int | None  # the mask's true entries, read from the device (None where not asked for)


def significant_mask(logits: torch.Tensor, fraction: float, maxsig: int, counted: bool = False) -> SignificantSet:
    """Per particle (rows of (n, S) logits): the smallest set holding ``fraction`` of the posterior mass, by sort +
    cumulative sum, as RELION's adaptive oversampling (significant_set of the softmax)."""
    return significant_set(torch.softmax(logits, dim=1), fraction, maxsig, counted)


def significant_set(p: torch.Tensor, fraction: float, maxsig: int, counted: bool = False) -> SignificantSet:
    """significant_mask of rows that are already probabilities (n, S); with ``counted`` also the mask's total."""
    S = p.shape[1]
    # The mass is almost always in a few samples: rank the largest TOPK_SIGNIFICANT first (top-k, far cheaper than
    # sorting 10^5-10^6 samples per particle) and sort in full only the rows whose fraction lies beyond them: the
    # same leading values in the same order, so the same set as a full sort (up to rounding in the cumulative sum).
    k = min(S, max(TOPK_SIGNIFICANT, maxsig))
    sp = top_values(p, k) if k < S else torch.sort(p, dim=1, descending=True).values
    count, thresh = _edge(sp, sp, fraction, maxsig)
    mask, total = None, None
    if k < S:  # else sorted in full already (the clamps below give such rows all S samples)
        beyond = count > k  # the fraction lies beyond the top k (never with --maxsig <= k)
        if counted:  # one wait for the device: the set's total, and whether any row needs its full sort
            mask = p >= thresh
            # count_nonzero, not sum: a boolean sum widens to int64 first (on the CPU 20-50x slower at 10^8 samples)
            n_beyond, total = torch.stack([torch.count_nonzero(beyond), torch.count_nonzero(mask)]).tolist()
            rows = torch.nonzero_static(beyond, size=n_beyond)[:, 0] if n_beyond else None  # size known: no wait
        else:  # one wait: the rows that do
            rows = beyond.nonzero()[:, 0]
        if rows is not None and len(rows):
            full = torch.sort(p[rows], dim=1, descending=True).values
            count[rows] = ((torch.cumsum(full, dim=1) < fraction).sum(1) + 1).clamp(max=S)
            thresh[rows] = full.gather(1, (count[rows] - 1)[:, None])
            mask, total = None, None
    count = count.clamp(max=S)
    if mask is None:
        mask = p >= thresh
    if counted and total is None:
        total = int(torch.count_nonzero(mask))
    return SignificantSet(mask, count, total)


def _edge(
    ranked: torch.Tensor, probabilities: torch.Tensor, fraction: float, maxsig: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the k largest samples ``ranked`` (n, k), descending, and their ``probabilities``: how many samples
    the set takes (the smallest count whose mass reaches ``fraction``, at most ``maxsig`` if > 0; beyond k where the
    k hold less) and the threshold value in ``ranked`` (its last sample within the k)."""
    count = (torch.cumsum(probabilities, dim=1) < fraction).sum(1) + 1
    if maxsig > 0:
        count = count.clamp(max=maxsig)
    return count, ranked.gather(1, (count.clamp(max=ranked.shape[1]) - 1)[:, None])


def significant_from_blocks(
    logits: torch.Tensor, largest: torch.Tensor, sum_exp: torch.Tensor, fraction: float, maxsig: int
) -> SignificantSet:
    """significant_mask(logits, ..., counted=True) of logits (n, S) whose blocks of TOPK_BLOCK consecutive samples are
    summarised already: each block's ``largest`` logit and Σ exp(logit − largest) ``sum_exp`` (n, S / TOPK_BLOCK), as
    coarse_epilogue writes them with the scores. The softmax's normaliser comes from the blocks, the ranked samples
    from the blocks with the largest maxima (top_values's argument), and the set is the samples at or above the
    threshold's logit: the logits are read once, for the mask, where softmax, top-k and the mask read them six times.
    Rows whose fraction lies beyond the top TOPK_SIGNIFICANT go through significant_mask."""
    n, S = logits.shape
    B = TOPK_BLOCK
    k = min(S, max(TOPK_SIGNIFICANT, maxsig))
    top = largest.amax(1, keepdim=True)
    # the normaliser relative to the row's largest logit, as softmax's: a log-normaliser top + log(Σ) would round at
    # top's magnitude (diff2 ~10^4: ~10^-3, as much relative error in every probability)
    norm = (sum_exp * torch.exp(largest - top)).sum(1, keepdim=True)
    n_blocks = min(k, S // B)
    best = torch.topk(largest, n_blocks, dim=1).indices
    candidates = logits.view(n, S // B, B).gather(1, best[:, :, None].expand(n, n_blocks, B)).reshape(n, -1)
    ranked = torch.topk(candidates, k, dim=1).values  # the k largest logits, descending
    count, thresh = _edge(ranked, torch.exp(ranked - top) / norm, fraction, maxsig)
    mask = logits >= thresh
    beyond = count > k  # the fraction lies beyond the top k (never with --maxsig <= k)
    n_beyond, total = torch.stack([torch.count_nonzero(beyond), torch.count_nonzero(mask)]).tolist()
    if n_beyond:
        rows = torch.nonzero_static(beyond, size=n_beyond)[:, 0]
        full = significant_mask(logits[rows], fraction, maxsig)
        mask[rows], count[rows] = full.mask, full.nsig
        total = int(torch.count_nonzero(mask))
    return SignificantSet(mask, count.clamp(max=S), total)


def coarse_significant(
    logp: torch.Tensor, settings: EStepSettings, blocks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Significant coarse samples: mask (n, K, T, L), count (n,) and the mask's total; the best one only with
    --firstiter_cc. ``blocks``: the scores' block maxima and sums (significant_from_blocks), where known."""
    n = logp.shape[0]
    flat = logp.reshape(n, -1)
    if settings.firstiter_cc:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.arange(n, device=flat.device), flat.argmax(1)] = True
        return mask.reshape(logp.shape), torch.ones(n, dtype=torch.long, device=flat.device), n
    fraction, maxsig = settings.adaptive_fraction, settings.maxsig
    found = (
        significant_mask(flat, fraction, maxsig, counted=True)
        if blocks is None
        else significant_from_blocks(flat, *blocks, fraction, maxsig)
    )
    assert found.total is not None  # counted
    return found.mask.reshape(logp.shape), found.nsig, found.total


@dataclass
class FineWeights:
    """The fine posterior of m particles over their T4 translations × 8L slot rotations."""

    gamma: (
        torch.Tensor
    )  # (m, T4·8L) posterior probability of each fine sample (one-hot on the best with --firstiter_cc)
    best: torch.Tensor  # (m,) flat index of the best sample
    max_prob: torch.Tensor  # (m,) its probability, RELION's rlnMaxValueProbDistribution (1 with --firstiter_cc)
    log_sum: torch.Tensor  # (m,) float64 log Σ exp(score) (the best score with --firstiter_cc)


def convert_fine_to_weights(log_scores: torch.Tensor, cc: bool) -> FineWeights:
    """The fine pass's posteriors from log-scores (m, S) (−diff2 + log priors; −inf where not evaluated): normalised
    exponentials, or with --firstiter_cc all weight on the best sample (ties shared), as RELION."""
    mx, arg = log_scores.max(1)
    if cc:
        gamma = (log_scores == mx[:, None]).float()
        gamma = gamma / gamma.sum(1, keepdim=True)
        return FineWeights(gamma, arg, torch.ones_like(mx), mx.double())
    lse = mx.double() + torch.log(torch.exp(log_scores - mx[:, None]).sum(1).double())
    return FineWeights(torch.exp(log_scores - lse[:, None].float()), arg, torch.exp(mx.double() - lse).float(), lse)


NEGLIGIBLE_SAMPLE_WEIGHT = (
    1e-5  # posterior probability below which a fine sample outside RELION's significant set is dropped
)


# set_threshold's radix levels: bits of a float32's pattern per level, from the exponent's top (the sign bit of a
# probability is 0); 256 buckets a level keep the per-row bucket arrays small where rows are short
RADIX_LEVELS = (8, 8, 8, 7)
RADIX_CHUNK_SAMPLES = 1 << 22  # samples (and buckets) per chunk of rows: its temporaries (~20 bytes each) ~80 MB


def set_threshold(p: torch.Tensor, fraction: float) -> torch.Tensor:
    """The threshold (m,) of significant_set's set in each row of p (m, S) (probabilities, float32): the largest value
    v of the row with Σ p[p ≥ v] ≥ ``fraction`` (at most the row's largest), so that ``p >= threshold`` is the set (0
    where the whole row holds less). Found without sorting or waiting for the device: non-negative float32 values
    order as their bit patterns, so a radix select over RADIX_LEVELS of the pattern, each level one scatter-add of the
    mass into buckets and a cumulative sum from the top. On a GPU the sort path waits for the device to learn which
    rows need a full sort, once per fine-pass group (20-40 waits an iteration); this does not. The same set up to
    rounding in the sums."""
    m, S = p.shape
    if m == 0:
        return p.new_zeros(0)
    rows = max(1, RADIX_CHUNK_SAMPLES // max(S, 1 << max(RADIX_LEVELS)))
    return torch.cat([_radix_threshold(p[r : r + rows].contiguous(), fraction) for r in range(0, m, rows)])


def _radix_threshold(p: torch.Tensor, fraction: float) -> torch.Tensor:
    m, dev = p.shape[0], p.device
    bits = p.view(torch.int32)
    above = torch.zeros(m, dtype=torch.float64, device=dev)  # mass of the buckets above the chosen ones
    chosen = torch.zeros(m, dtype=torch.int32, device=dev)  # the threshold's pattern, level by level
    inside = torch.ones_like(bits, dtype=torch.bool)  # samples in the chosen buckets so far
    shift = 31
    for width in RADIX_LEVELS:
        shift -= width
        key = ((bits >> shift) & ((1 << width) - 1)).long()
        buckets = torch.zeros(m, 1 << width, dtype=torch.float32, device=dev)
        buckets = buckets.scatter_add_(1, key, torch.where(inside, p, 0.0)).double()
        from_top = above[:, None] + buckets.flip(1).cumsum(1).flip(1)  # mass at or above each bucket
        reached = (from_top >= fraction) & (from_top > 0)  # (> 0: a fraction <= 0 is reached at the largest sample)
        b = (reached.sum(1) - 1).clamp(min=0)  # the highest bucket reaching the fraction (0 where none does)
        above = torch.where(reached.any(1), (from_top - buckets).gather(1, b[:, None])[:, 0], 0.0)
        chosen |= b.int() << shift
        inside &= key == b[:, None]
    return chosen.view(torch.float32)


def negligible_dropped(gam: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fine posterior (m, S) without the samples RELION's storeWeightedSums skips (outside the smallest set holding
    ``fraction`` of the mass) that also weigh < NEGLIGIBLE_SAMPLE_WEIGHT; not renormalised, as RELION's.

    Rotations left without weight are then not back-projected (most children of a local search's significant coarse
    rotations), which was most of storeWeightedSums. The second condition bounds what a rounding-level change of a
    sample at the threshold can change (1e-5 of one particle), so tiling and rank count still give the same sums.
    The set by set_threshold on a GPU (no wait for the device), by significant_set (top-k, fewer passes) elsewhere.
    """
    if gam.is_cuda and gam.dtype == torch.float32:
        keep = gam >= set_threshold(gam, fraction)[:, None]
    else:
        keep = significant_set(gam, fraction, 0).mask
    return torch.where(
        keep | (gam >= NEGLIGIBLE_SAMPLE_WEIGHT), gam, torch.zeros((), dtype=gam.dtype, device=gam.device)
    )
