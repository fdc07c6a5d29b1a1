"""RELION's learned priors: of the classes (pdf_class) and of the orientations (pdf_direction), where the posterior
mass of the last iteration went."""

from __future__ import annotations

import torch


MIN_CLASS_PRIOR = 1e-5  # a class's prior is kept at least this (then renormalised): an empty class may be refilled


def class_prior(class_weight: torch.Tensor) -> torch.Tensor:
    """RELION's pdf_class, (K,): each class's share of the posterior mass, at least MIN_CLASS_PRIOR, summing to 1."""
    prior = (class_weight / class_weight.sum().clamp(min=1e-30)).clamp(min=MIN_CLASS_PRIOR)
    return prior / prior.sum()


def direction_prior(direction_weight: torch.Tensor) -> torch.Tensor:
    """RELION's pdf_direction (maximizationOtherParameters), (K, D): each class's posterior mass in each direction over
    the particles' total, i.e. p(class, direction). No smoothing: a direction no particle kept stays at 0 (its samples
    are not scored) until the sampling changes and the prior starts again uniform."""
    total = direction_weight.sum()
    return direction_weight / total.clamp(min=1e-300)


def direction_log_prior(prior: torch.Tensor | None, n_directions: int, local_search: bool) -> torch.Tensor | None:
    """The log of ``prior`` for an E-step with ``n_directions`` directions, or None (uniform): RELION uses the learned
    prior only in global searches (local ones use the Gaussian prior about each particle's pose instead, without a class
    prior), and a prior from another HEALPix order is reset to uniform."""
    if prior is None or local_search or prior.shape[-1] != n_directions:
        return None
    return torch.log(prior.clamp(min=1e-300))
