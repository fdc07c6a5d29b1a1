"""With the true poses, our reconstruction beside relion_reconstruct's (RELION 3.1.3) on a noisy simulated set: the map
of all particles and the two half maps (rlnRandomSubset 1/2, what an auto-refine's _unfil maps are), each judged by its
unmasked FSC to the truth (0.5 and 0.143 crossings, one FSC tool for both programs).

usage: python bench/reconstruct_vs_relion.py WORKDIR [--model 4E43.pdb] [--n 3000] [--box 96] [--angpix 1.2]
       [--snr 0.05]
Writes bench/results/<date>-cpu-reconstruct-vs-relion.{md,json} (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from cryorefine.cli.simulate import truth_map
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.io.star import read_star, write_star
from cryorefine.reconstruction.from_particles import reconstruct_from_particles
from cryorefine.reconstruction.fsc import fsc_curve, resolution_shell, shell_to_angstrom
from cryorefine.simulate import simulate_particles


def crossings(f: torch.Tensor, box: int, angpix: float) -> dict:
    return {
        f"fsc_{t}": {
            "shell": resolution_shell(f, t),
            "angst": round(shell_to_angstrom(resolution_shell(f, t), box, angpix), 3),
        }
        for t in (0.5, 0.143)
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work"), ap.add_argument("--model", default=None), ap.add_argument("--n", type=int, default=3000)
    (
        ap.add_argument("--box", type=int, default=96),
        ap.add_argument("--angpix", type=float, default=1.2),
        ap.add_argument("--snr", type=float, default=0.05),
    )
    ap.add_argument("--seed", type=int, default=5), ap.add_argument("--out", default=None)
    a = ap.parse_args()
    d = Path(a.work)
    d.mkdir(parents=True, exist_ok=True)
    sim = simulate_particles(truth_map(a.model, a.box, a.angpix, 50.0), a.angpix, d, a.n, snr=a.snr, seed=a.seed)
    blocks = read_star(d / "particles.star")  # the truth poses; halves 1/2 alternate
    blocks["particles"]["rlnRandomSubset"] = 1 + np.arange(a.n) % 2
    write_star(d / "particles.star", blocks)
    truth = torch.from_numpy(read_map(d / "truth.mrc")[0]).double()
    table = load_particles(d / "particles.star", project_dir=d)
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": " ".join(
            ["python bench/reconstruct_vs_relion.py", a.work]
            + [f"--{k} {v}" for k, v in vars(a).items() if k not in ("work", "out") and v is not None]
        ),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "set": {
            "n": a.n,
            "box": a.box,
            "angpix": a.angpix,
            "snr": a.snr,
            "model": a.model or "6msm (packaged)",
            "noise_sigma": sim["noise_sigma"],
        },
    }
    for label, subset in (("all", None), ("half1", 1), ("half2", 2)):
        t0 = time.perf_counter()
        args = ["relion_reconstruct", "--i", str(d / "particles.star"), "--o", str(d / f"relion_{label}.mrc"), "--ctf"]
        args += [] if subset is None else ["--subset", str(subset)]
        # from the directory simulate ran in: the image names are relative to it
        p = subprocess.run(args, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        t_relion = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = reconstruct_from_particles(table, ctf=True, subset=subset, dtype=torch.float64)[0].double()
        t_ours = time.perf_counter() - t0
        theirs = torch.from_numpy(read_map(d / f"relion_{label}.mrc")[0]).double()
        fo, ft = fsc_curve(ours, truth), fsc_curve(theirs, truth)
        res[label] = {
            "ours": crossings(fo, a.box, a.angpix),
            "relion": crossings(ft, a.box, a.angpix),
            "ours_s": round(t_ours, 1),
            "relion_s": round(t_relion, 1),
            "fsc_to_truth_ours": [round(float(x), 4) for x in fo],
            "fsc_to_truth_relion": [round(float(x), 4) for x in ft],
        }
    prefix = a.out or f"bench/results/{res['date']}-cpu-reconstruct-vs-relion"
    Path(prefix + ".json").write_text(json.dumps(res, indent=1))
    md = [
        "# Reconstruction with the true poses: cryorefine beside relion_reconstruct (RELION 3.1.3)",
        "",
        f"{res['date']}, {res['machine']}, commit {res['commit']}: `{res['command']}`",
        "",
        f"{a.n} particles of {res['set']['model']}, box {a.box}, {a.angpix} Å/px, SNR {a.snr}, CTF; "
        "unmasked FSC to the truth.",
        "",
        "| map | ours FSC 0.5 | RELION FSC 0.5 | ours FSC 0.143 | RELION FSC 0.143 |",
        "|---|---|---|---|---|",
    ]
    for label in ("all", "half1", "half2"):
        o, r = res[label]["ours"], res[label]["relion"]
        md.append(
            f"| {label} | {o['fsc_0.5']['angst']} Å (shell {o['fsc_0.5']['shell']}) | "
            f"{r['fsc_0.5']['angst']} Å (shell {r['fsc_0.5']['shell']}) "
            f"| {o['fsc_0.143']['angst']} Å | {r['fsc_0.143']['angst']} Å |"
        )
    Path(prefix + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
