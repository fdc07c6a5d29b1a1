"""convertAllSquaredDifferencesToWeights: posteriors from the scores, and the significant samples of each pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import EStepSettings


TOPK_SIGNIFICANT = 256  # samples ranked per particle before falling back to a full sort


def significant_mask(logits: torch.Tensor, fraction: float, maxsig: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per particle (rows of (n, S) logits): the smallest set holding ``fraction`` of the posterior mass.

    Returns (mask (n, S), count (n,)). Sort + cumulative sum, as RELION's adaptive oversampling.
    """
    return significant_set(torch.softmax(logits, dim=1), fraction, maxsig)


def significant_set(p: torch.Tensor, fraction: float, maxsig: int) -> tuple[torch.Tensor, torch.Tensor]:
    """significant_mask of rows that are already probabilities (n, S)."""
    S = p.shape[1]
    # The mass is almost always in a few samples: rank the largest TOPK_SIGNIFICANT first (top-k, far cheaper than
    # sorting 10^5-10^6 samples per particle) and sort in full only the rows whose fraction lies beyond them: the
    # same leading values in the same order, so the same set as a full sort (up to rounding in the cumulative sum).
    k = min(S, max(TOPK_SIGNIFICANT, maxsig))
    sp = torch.topk(p, k, dim=1).values if k < S else torch.sort(p, dim=1, descending=True).values
    count = (torch.cumsum(sp, dim=1) < fraction).sum(1) + 1
    if maxsig > 0:
        count = count.clamp(max=maxsig)
    thresh = sp.gather(1, (count.clamp(max=k) - 1)[:, None])
    if k < S:  # else sorted in full already (the clamps below give such rows all S samples): no wait for the device
        rows = (count > k).nonzero()[:, 0]  # the fraction lies beyond the top k (never with --maxsig <= k)
        if len(rows):
            full = torch.sort(p[rows], dim=1, descending=True).values
            count[rows] = ((torch.cumsum(full, dim=1) < fraction).sum(1) + 1).clamp(max=S)
            thresh[rows] = full.gather(1, (count[rows] - 1)[:, None])
    count = count.clamp(max=S)
    mask = p >= thresh
    return mask, count


def coarse_significant(logp: torch.Tensor, settings: EStepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Significant coarse samples: mask (n, K, T, L) and count (n,); the best one only with --firstiter_cc."""
    n = logp.shape[0]
    flat = logp.reshape(n, -1)
    if settings.firstiter_cc:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.arange(n, device=flat.device), flat.argmax(1)] = True
        return mask.reshape(logp.shape), torch.ones(n, dtype=torch.long, device=flat.device)
    mask, nsig = significant_mask(flat, settings.adaptive_fraction, settings.maxsig)
    return mask.reshape(logp.shape), nsig


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


def negligible_dropped(gam: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fine posterior (m, S) without the samples RELION's storeWeightedSums skips (outside the smallest set holding
    ``fraction`` of the mass) that also weigh < NEGLIGIBLE_SAMPLE_WEIGHT; not renormalised, as RELION's.

    Rotations left without weight are then not back-projected (most children of a local search's significant coarse
    rotations), which was most of storeWeightedSums. The second condition bounds what a rounding-level change of a
    sample at the threshold can change (1e-5 of one particle), so tiling and rank count still give the same sums.
    """
    keep, _ = significant_set(gam, fraction, 0)
    return torch.where(
        keep | (gam >= NEGLIGIBLE_SAMPLE_WEIGHT), gam, torch.zeros((), dtype=gam.dtype, device=gam.device)
    )
