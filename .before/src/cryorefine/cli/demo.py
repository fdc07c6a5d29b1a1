"""Demo on the embedded default: simulate a small set from the packaged 6msm model (human CFTR), refine it from a
30 Å low-passed start, and report the final resolution and the pose error against the truth.

Example: cryorefine demo            (a few minutes on a laptop CPU)
         cryorefine demo --gpu --n 5000 --box 96 --angpix 2.0
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def add_args(p):
    p.add_argument("--o", default="cryorefine_demo", help="output folder")
    p.add_argument("--n", type=int, default=300, help="number of simulated particles")
    p.add_argument("--box", type=int, default=40, help="box size (pixels)")
    p.add_argument("--angpix", type=float, default=4.8, help="pixel size (Å)")
    p.add_argument("--snr", type=float, default=0.2, help="signal-to-noise ratio of the simulated images")
    p.add_argument("--iter", type=int, default=8, help="at most this many iterations")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--gpu", nargs="?", const="0", default=None, help="use CUDA (optionally a device id, e.g. --gpu 1)")
    p.add_argument("--j", dest="threads", type=int, default=0, help="CPU threads (0 = PyTorch's default)")


def main(args):
    from ..density import atoms_to_map, model_radius_angst, packaged_model, read_atoms
    from ..evaluation import map_resolution, pose_errors, read_poses, summarise_pose_errors
    from ..fourier.filters import low_pass_filter
    from ..io.mrc import read_map, write_map
    from ..refine.auto_refine import refine
    from ..refine.config import RefineConfig
    from ..simulate import NO_POSES_STAR, simulate_particles
    from .refine import device_from_args

    out = Path(args.o)
    out.mkdir(parents=True, exist_ok=True)
    xyz, w = read_atoms(packaged_model())
    diameter = 2 * model_radius_angst(xyz) + 10.0
    diameter = min(diameter, 0.95 * args.box * args.angpix)
    device = device_from_args(args)
    truth = atoms_to_map(xyz, w, args.box, args.angpix, bfactor=50.0)
    print(
        f"demo: simulating {args.n} particles of 6msm (box {args.box}, {args.angpix} Å/px, SNR {args.snr}) in {out}/",
        flush=True,
    )
    simulate_particles(
        truth,
        args.angpix,
        out / "data",
        args.n,
        snr=args.snr,
        seed=args.seed,
        device=device if device != "cpu" else None,
    )
    truth_scaled, _ = read_map(out / "data" / "truth.mrc")
    start = low_pass_filter(torch.from_numpy(truth_scaled).double(), 30.0, args.angpix).float()
    write_map(out / "data" / "start_30A.mrc", start.numpy(), args.angpix)
    cfg = RefineConfig(
        particles=str(out / "data" / NO_POSES_STAR),
        output_root=str(out / "refine" / "run"),
        reference=str(out / "data" / "start_30A.mrc"),
        ini_high=30.0,
        particle_diameter=diameter,
        ctf=True,
        flatten_solvent=True,
        zero_mask=True,
        random_seed=args.seed,
        device=device,
        threads=args.threads,
        auto_local_healpix_order=4,
        max_iter=args.iter,
        offset_range=3,
        offset_step=1.5,
    )
    summary = refine(cfg)
    errors = pose_errors(read_poses(cfg.output_root + "_data.star"), read_poses(out / "data" / "particles.star"), "C1")
    result = summarise_pose_errors(errors)
    final_map, _ = read_map(cfg.output_root + "_class001.mrc")
    fsc_truth = map_resolution(torch.from_numpy(final_map), torch.from_numpy(truth_scaled), args.angpix)[
        "resolution_angst"
    ]
    result.update({"map_vs_truth_fsc_0.5_angst": round(fsc_truth[0.5], 2)})
    result.update(
        {
            "final_resolution_angst": summary["final_resolution_angst"],
            "iterations": summary["iterations"],
            "seconds": round(summary["seconds"], 1),
        }
    )
    print(json.dumps(result))
