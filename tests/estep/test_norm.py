"""--norm: the per-particle normalisation correction recovers known intensity scales of the images (RELION's
rlnNormCorrection = the image's residual noise std), and a negative control without scaling stays flat."""

import mrcfile
import numpy as np
import torch

from cryorefine.mstep.statistics import GroupScales
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.images import Window
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.sums import WeightedSums
from cryorefine.geometry.healpix import make_sampling
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.mixture import state_maps
from cryorefine.mstep.noise import initial_sigma2
from cryorefine.mstep.norm import updated_norm_corrections
from cryorefine.refine.config import RefineConfig
from cryorefine.refine.engine import EStepPass, EStepRuntime, ParticlePoses, prepare_references, run_expectation
from cryorefine.refine.timing import StageTimer
from cryorefine.simulate import simulate_particles

BOX, ANGPIX, N = 32, 6.0, 40


def estimated_norms(tmp_path, scales):
    simulate_particles(state_maps(BOX, ANGPIX, 100.0)[0], ANGPIX, tmp_path, N, snr=0.3, seed=4, max_shift_angst=3.0)
    with mrcfile.open(tmp_path / "particles.mrcs", "r+") as m:
        m.data[:] = m.data * scales[:, None, None].astype(np.float32)
    table = load_particles(tmp_path / "particles.star")
    truth, _ = read_map(tmp_path / "truth.mrc")
    cfg = RefineConfig(
        particles="", output_root="", reference="", particle_diameter=170, ctf=True, zero_mask=True, angpix=ANGPIX
    )
    grid = PoseGrid.build(make_sampling(1, "C1", 0.0), 2.0, 1.0)
    window = Window.build(BOX, 12)
    poses = ParticlePoses.from_table(table)
    sums = WeightedSums.zeros(1, BOX, 2, 1, grid.sampling.n_directions)
    refs = prepare_references([torch.from_numpy(truth)], 2, None)
    settings = EStepSettings(angpix=ANGPIX, sigma2_offset_angst2=36.0)
    job = EStepPass(
        refs, grid, window, 8, initial_sigma2(table, 1)[0], GroupScales.one_for_all(len(table)), settings, avg_norm=1.0
    )
    run_expectation(table, np.arange(N), poses, job, sums, EStepRuntime(cfg, (0, 1, 0), StageTimer(), None, 64))
    return updated_norm_corrections(poses.norm_correction, 1.0, poses.residual_power, BOX)  # the M-step's update


def test_norm_correction_follows_image_scale(tmp_path):
    scales = np.linspace(0.6, 1.4, N)[np.random.default_rng(1).permutation(N)]
    norm = estimated_norms(tmp_path, scales)
    assert np.corrcoef(norm, scales)[0, 1] > 0.95
    ratio = norm / scales
    assert ratio.std() / ratio.mean() < 0.1
    assert 0.7 < ratio.mean() < 1.3  # unit-noise images: the correction is the noise std


def test_norm_correction_flat_without_scaling(tmp_path):
    norm = estimated_norms(tmp_path, np.ones(N))
    assert norm.std() / norm.mean() < 0.1


def test_bad_norm_values_in_the_star_start_at_one(tmp_path):

    from cryorefine.io.star import read_star, write_star

    simulate_particles(state_maps(BOX, ANGPIX, 100.0)[0], ANGPIX, tmp_path, 4, snr=0.3, seed=4)
    blocks = read_star(tmp_path / "particles.star")
    blocks["particles"]["rlnNormCorrection"] = [0.0, float("nan"), -2.0, 1.5]
    write_star(tmp_path / "particles.star", blocks)
    poses = ParticlePoses.from_table(load_particles(tmp_path / "particles.star"))
    np.testing.assert_array_equal(poses.norm_correction, [1.0, 1.0, 1.0, 1.5])
