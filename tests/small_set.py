"""A small simulated particle set for engine tests: one state of the packaged mixture, and a start map low-passed to 30 Å."""

import torch

from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.mixture import state_maps
from cryorefine.simulate import simulate_particles


def small_set(d, box: int, angpix: float, n: int, seed: int):
    """particles.star (+ stack, truth.mrc) and start.mrc in folder ``d``; returns ``d``."""
    simulate_particles(state_maps(box, angpix, 100.0)[0], angpix, d, n, snr=0.5, seed=seed, max_shift_angst=3.0)
    t, _ = read_map(d / "truth.mrc")
    write_map(d / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, angpix).float().numpy(), angpix)
    return d
