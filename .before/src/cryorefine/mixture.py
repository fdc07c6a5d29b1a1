"""Simulated mixtures of distinct states (for classification tests and benchmarks), truth class kept per particle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .density import atoms_to_map, packaged_model, read_atoms
from .io.star import read_star, write_star
from .simulate import simulate_particles, without_poses


THIRD_STATES = ("moved", "removed")


def state_maps(box: int, angpix: float, bfactor: float = 50.0, third: str = "moved") -> list[torch.Tensor]:
    """Three states of 6msm: the whole model; the part with z > 20 Å (from the centroid) removed; and the part with
    x < −15 Å moved 12 Å along +y (``third="moved"``: a subtle change) or removed (``"removed"``: a distinct one)."""
    if third not in THIRD_STATES:
        raise ValueError(f"third state must be one of {THIRD_STATES} (got {third!r})")
    xyz, w = read_atoms(packaged_model())
    c = xyz - xyz.mean(0)
    a = atoms_to_map(c, w, box, angpix, bfactor, centre=False)
    keep = c[:, 2] <= 20.0
    b = atoms_to_map(c[keep], w[keep], box, angpix, bfactor, centre=False)
    side = c[:, 0] < -15.0
    if third == "moved":
        moved = c.copy()
        moved[side, 1] += 12.0
        cc = atoms_to_map(moved, w, box, angpix, bfactor, centre=False)
    else:
        cc = atoms_to_map(c[~side], w[~side], box, angpix, bfactor, centre=False)
    return [a, b, cc]


def simulate_mixture(
    out_dir,
    n: int,
    box: int,
    angpix: float,
    snr: float = 0.05,
    seed: int = 0,
    device=None,
    third: str = "moved",
    **kwargs,
) -> dict:
    """out_dir/particles.star over out_dir/state{1,2,3}/particles.mrcs (rlnClassNumber = the true state) and truth maps;
    out_dir/particles_in.star is the same without the poses and the states (what a classification starts from). The
    image names are simulate's: relative to the directory this runs in (absolute for a folder outside it)."""
    out = Path(out_dir)
    maps = state_maps(box, angpix, third=third)
    counts = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    sigma = None
    parts, optics = [], None
    for k, (vol, m) in enumerate(zip(maps, counts)):
        info = simulate_particles(
            vol,
            angpix,
            out / f"state{k + 1}",
            m,
            snr=snr,
            seed=seed + 101 * k,
            device=device,
            noise_sigma=sigma,
            **kwargs,
        )
        sigma = info["noise_sigma"]
        blocks = read_star(out / f"state{k + 1}" / "particles.star")
        optics = blocks["optics"]
        p = blocks["particles"]
        p["rlnClassNumber"] = k + 1
        parts.append(p)
    parts = pd.concat(parts, ignore_index=True)
    perm = np.random.default_rng(seed).permutation(len(parts))
    parts = parts.iloc[perm].reset_index(drop=True)
    write_star(out / "particles.star", {"optics": optics, "particles": parts})
    hidden = [h for h in ("rlnRandomSubset", "rlnClassNumber") if h in parts]
    write_star(out / "particles_in.star", {"optics": optics, "particles": without_poses(parts).drop(columns=hidden)})
    return {"n": len(parts), "counts": counts, "noise_sigma": sigma}
