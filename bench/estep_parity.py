"""One E-step from the same state on CPU and on CUDA: same best pose, max-probability and log-likelihood, time per
stage.

usage: python bench/estep_parity.py PARTICLES.star REF.mrc[,REF2.mrc,...] DIAMETER_ANGST [N_PARTICLES] [WINDOW_SHELL]
       > result.json
With one reference the state is the start of an auto-refine (reference low-passed to 30 Å, σ² from the images);
with K comma-separated class maps (e.g. from a classification run) it is a K-class E-step with the maps as given
and equal class priors, and the result adds the fraction of particles given the same class. Healpix order 2
global search with offsets 5/2 px, N particles.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from cryorefine.mstep.statistics import GroupScales
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.images import Window
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.sums import WeightedSums
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.geometry.healpix import make_sampling
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.mstep.noise import initial_sigma2
from cryorefine.refine.engine import (
    EStepPass,
    EStepRuntime,
    ParticlePoses,
    angular_change_deg,
    prepare_references,
    run_expectation,
)
from cryorefine.refine.config import RefineConfig
from cryorefine.refine.schedule import Schedule
from cryorefine.refine.timing import StageTimer


def one_estep(device: str, star: str, ref_path: str, diameter: float, n: int, window_shell: int, order: int) -> dict:
    table = load_particles(star)
    paths = ref_path.split(",")
    maps = [read_map(p) for p in paths]
    angpix = maps[0][1]
    cfg = RefineConfig(
        particles=star,
        output_root="/tmp/parity",
        reference=ref_path,
        particle_diameter=diameter,
        ctf=True,
        flatten_solvent=True,
        zero_mask=True,
        device=device,
        angpix=angpix,
    )
    box = table.box
    if len(maps) == 1:
        starts = [low_pass_filter(torch.from_numpy(maps[0][0]).double(), 30.0, angpix).float()]
    else:
        starts = [torch.from_numpy(m).float() for m, _ in maps]
    K = len(starts)
    sigma2 = initial_sigma2(table, len(table.optics), device=device)[0]
    grid = PoseGrid.build(make_sampling(order, "C1", 0.25), 5.0, 2.0, device=device)
    sch = Schedule(order, 5.0, 2.0)
    coarse = sch.coarse_shell(window_shell, box, angpix, diameter)
    window = Window.build(box, window_shell, device)
    timer = StageTimer(device)
    refs = prepare_references(starts, 2, device)
    poses = ParticlePoses.from_table(table)
    sums = WeightedSums.zeros(K, box, 2, len(table.optics), grid.sampling.n_directions, device=device)
    settings = EStepSettings(angpix=angpix, sigma2_offset_angst2=(5 * angpix) ** 2)
    rows = np.arange(min(n, len(table)))
    t0 = time.perf_counter()
    job = EStepPass(refs, grid, window, coarse, sigma2, GroupScales.one_for_all(len(table)), settings)
    runtime = EStepRuntime(cfg, (0, 1, 1), timer, None, 1024 if device.startswith("cuda") else 256)
    run_expectation(table, rows, poses, job, sums, runtime)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "poses": poses,
        "wall_s": wall,
        "stages": dict(timer.seconds),
        "bp_weight_sum": sum(float(bp.weight.sum()) for bp in sums.backprojectors),
        "sigma2_sum": float(sums.sigma2_noise.sum()),
        "window": window_shell,
        "coarse": coarse,
        "n": len(rows),
    }


def main():
    star, ref, diameter = sys.argv[1], sys.argv[2], float(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    window_shell = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    torch.set_num_threads(16)
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    gpu = one_estep("cuda", star, ref, diameter, n, window_shell, 2)
    gpu = one_estep("cuda", star, ref, diameter, n, window_shell, 2)  # second run: warm timings
    cpu = one_estep("cpu", star, ref, diameter, n, window_shell, 2)
    pc, pg = cpu["poses"], gpu["poses"]
    rows = np.arange(cpu["n"])
    d_ang = angular_change_deg(
        pc.rot_deg[rows], pc.tilt_deg[rows], pc.psi_deg[rows], pg.rot_deg[rows], pg.tilt_deg[rows], pg.psi_deg[rows]
    )
    d_off = np.hypot(
        pc.origin_x_angst[rows] - pg.origin_x_angst[rows], pc.origin_y_angst[rows] - pg.origin_y_angst[rows]
    )
    same_class = pc.class_number[rows] == pg.class_number[rows]
    same = (d_ang < 1e-3) & (d_off < 1e-3) & same_class
    out.update(
        {
            "particles": cpu["n"],
            "window_shell": cpu["window"],
            "coarse_shell": cpu["coarse"],
            "classes": len(ref.split(",")),
            "same_best_pose_fraction": float(same.mean()),
            "same_class_fraction": float(same_class.mean()),
            "max_prob_max_abs_diff": float(np.abs(pc.max_prob[rows] - pg.max_prob[rows]).max()),
            "max_prob_median_abs_diff": float(np.median(np.abs(pc.max_prob[rows] - pg.max_prob[rows]))),
            "loglik_max_abs_diff": float(np.abs(pc.loglik[rows] - pg.loglik[rows]).max()),
            "n_significant_equal_fraction": float((pc.n_significant[rows] == pg.n_significant[rows]).mean()),
            "mean_n_significant": float(pc.n_significant[rows].mean()),
            "bp_weight_rel_diff": abs(cpu["bp_weight_sum"] - gpu["bp_weight_sum"]) / abs(cpu["bp_weight_sum"]),
            "sigma2_rel_diff": abs(cpu["sigma2_sum"] - gpu["sigma2_sum"]) / abs(cpu["sigma2_sum"]),
            "cpu_wall_s": cpu["wall_s"],
            "gpu_wall_s": gpu["wall_s"],
            "cpu_stages_s": cpu["stages"],
            "gpu_stages_s": gpu["stages"],
            "cpu_threads": torch.get_num_threads(),
        }
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
