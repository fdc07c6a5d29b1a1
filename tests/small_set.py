"""Small simulated particle sets for engine tests: one state of the packaged mixture with a start map low-passed to
30 Å; the packaged 6msm model for the tests beside RELION."""

import torch

from cryorefine.density import atoms_to_map, packaged_model, read_atoms
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


def small_run_flags(d, out) -> list[str]:
    """The flags the engine tests' small runs share on a :func:`small_set` folder ``d`` (output root ``out``/run): the
    particles without poses, the start map, a 30 Å start, HEALPix order 1, offsets 2/1 px, CTF, flattened solvent."""
    argv = ["--i", str(d / "particles_noposes.star"), "--o", str(out / "run"), "--ref", str(d / "start.mrc")]
    argv += ["--ini_high", "30", "--particle_diameter", "170", "--ctf", "--flatten_solvent", "--healpix_order", "1"]
    return argv + ["--offset_range", "2", "--offset_step", "1"]


def packaged_model_set(d, n: int, seed: int, box: int = 32, angpix: float = 6.0):
    """The packaged model's particles (SNR 0.1) in folder ``d`` (particles_noposes.star, truth.mrc, ...), with an
    empty ``d/r`` for a RELION run's outputs; returns ``d``."""
    xyz, w = read_atoms(packaged_model())
    simulate_particles(atoms_to_map(xyz, w, box, angpix), angpix, d, n, snr=0.1, seed=seed)
    (d / "r").mkdir()
    return d
