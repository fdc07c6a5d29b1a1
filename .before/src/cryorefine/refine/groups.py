"""RELION 3.1's groups of the particles (Experiment::read): what its model.star's σ² and scale tables are per, and what
data.star's rlnGroupNumber numbers. RELION's continuation indexes its σ² by these groups: fewer in model.star would
crash it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..io.table import ParticleTable


@dataclass(frozen=True)
class RelionGroups:
    of_particle: np.ndarray  # (n,) each particle's group, 0-based
    names: list[str]  # (g,) the groups' names, in RELION's order
    optics: np.ndarray  # (g,) each group's optics group, 0-based (a micrograph's particles share one)


def relion_groups(table: ParticleTable) -> RelionGroups:
    """One group "group" without rlnMicrographName; else one per rlnGroupName, or per micrograph (its name after the
    job folder), numbered as they first appear with the particles sorted by micrograph name (a stable sort, as
    RELION's)."""
    extra = table.extra
    order = np.arange(len(table))  # RELION's order of the particles
    if "rlnMicrographName" not in extra.columns:
        of_particle, names = np.zeros(len(table), dtype=np.int64), ["group"]
    else:
        mics = extra["rlnMicrographName"].to_numpy().astype(str)
        order = np.argsort(mics, kind="stable")
        if "rlnGroupName" in extra.columns:
            labels = extra["rlnGroupName"].to_numpy().astype(str)
        else:
            unique_mics, of_mic = np.unique(mics, return_inverse=True)
            labels = np.array([after_job_folder(m) for m in unique_mics])[of_mic]
        unique, first = np.unique(labels[order], return_index=True)
        number = np.empty(len(unique), dtype=np.int64)
        number[np.argsort(first)] = np.arange(len(unique))
        of_particle, names = number[np.searchsorted(unique, labels)], [str(n) for n in unique[np.argsort(first)]]
    optics = np.zeros(len(names), dtype=np.int64)
    last_first = order[::-1]  # numpy keeps the last of repeated indices: RELION's group takes its first particle's
    optics[of_particle[last_first]] = table.optics_group[last_first]
    return RelionGroups(of_particle, names, optics)


def after_job_folder(name: str) -> str:
    """RELION's decomposePipelineFileName: what follows the first ".../jobNNN/" of a name (the whole name without)."""
    found = re.search(r"/job\d{3}", name[1:])
    if found is None:
        return name
    end = name.find("/", found.start() + 7)
    return name[end + 1 :] if end >= 0 else ""
