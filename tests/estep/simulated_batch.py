"""A simulated batch of the packaged 6msm model's particles for E-step tests (CTF, B-factor 50 Å², σ² from the
images)."""

from pathlib import Path

import numpy as np
import torch

from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.estep.images import ImageBatch, Window, prepare_batch
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.mstep.noise import initial_sigma2
from cryorefine.simulate import simulate_particles


def simulated_batch(
    out: Path, box: int, angpix: float, n: int, window_shell: int, snr: float, seed: int, max_shift_angst: float
) -> tuple[torch.Tensor, Window, ImageBatch]:
    """(truth map float64, window, batch of all n particles) simulated into ``out``."""
    xyz, w = read_atoms(packaged_model())
    simulate_particles(
        atoms_to_map(xyz, w, box, angpix, bfactor=50.0),
        angpix,
        out,
        n,
        snr=snr,
        seed=seed,
        max_shift_angst=max_shift_angst,
    )
    table = load_particles(out / "particles.star")
    window = Window.build(box, window_shell)
    batch = prepare_batch(
        table,
        np.arange(n),
        window,
        initial_sigma2(table, 1)[0],
        torch.ones(1, dtype=torch.float64),
        0.8 * box * angpix,
        angpix,
        True,
        True,
        torch.Generator().manual_seed(0),
        None,
    )
    return torch.from_numpy(read_map(out / "truth.mrc")[0]).double(), window, batch
