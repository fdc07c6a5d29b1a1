"""A refactor must not change results: a fixed-seed refinement and classification run at two commits, outputs compared.

usage: python bench/refactor_parity.py OLD NEW OUT.json [--gpu] [--deterministic] [--workdir DIR]
       (OLD, NEW: commits, or checkouts with src/)

Each commit is checked out into a git worktree and runs, in its own process with PYTHONPATH at its src/, the same
`cryorefine simulate` set (packaged 6msm, box 48, 4.5 Å/px, 300 particles, SNR 0.1, seed 11) through
`cryorefine refine` (3 iterations) and `cryorefine classify` (K 2, 3 iterations) from particles without poses.
Compared: the final maps (largest |new − old| / max |old|), the half maps of the refinement, the poses in data.star
(largest angle and offset difference) and the classes. Pass: maps within 1e-5 relative, the same poses (≤ 1e-3°,
1e-4 Å) and classes. Writes OUT.json with every figure, the commits and the device.
--deterministic runs both under torch.use_deterministic_algorithms (CUBLAS_WORKSPACE_CONFIG=:4096:8), set here and
not by the code under test, so that the GPU's atomic additions do not hide or fake a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DETERMINISTIC_MAIN = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from cryorefine.cli.main import main; sys.exit(main())"
)
FLAGS = (
    "--ini_high 30 --particle_diameter 200 --ctf --zero_mask --flatten_solvent --norm --healpix_order 1 "
    "--offset_range 3 --offset_step 1.5 --iter 3 --random_seed 3"
).split()


def run_at(commit: str, work: Path, data: Path, gpu: bool, deterministic: bool) -> Path:
    tree = Path(commit) if Path(commit).is_dir() else work / f"tree-{commit}"  # a checkout (with src/) or a commit
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "-f", "--detach", str(tree), commit], check=True, capture_output=True)
    out = work / f"out-{tree.name}"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]))
    dev = ["--gpu"] if gpu else ["--j", "2"]
    cmd = [sys.executable, "-m", "cryorefine.cli.main"]
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        cmd = [sys.executable, "-c", DETERMINISTIC_MAIN]
    common = ["--i", str(data / "particles_noposes.star"), "--ref", str(data / "start.mrc"), *FLAGS, *dev]
    subprocess.run(
        [*cmd, "refine", "--o", str(out / "refine" / "run"), *common], check=True, env=env, capture_output=True
    )
    subprocess.run(
        [*cmd, "classify", "--o", str(out / "classify" / "run"), "--K", "2", *common],
        check=True,
        env=env,
        capture_output=True,
    )
    return out


def compare(old: Path, new: Path) -> dict:
    import starfile
    import torch

    from cryorefine.evaluation import pose_errors, read_poses
    from cryorefine.io.mrc import read_map

    res = {}
    maps = {
        "refine/run_class001.mrc",
        "refine/run_half1_class001_unfil.mrc",
        "refine/run_half2_class001_unfil.mrc",
        *(p.relative_to(old).as_posix() for p in (old / "classify").glob("run_it003_class*.mrc")),
    }
    for name in sorted(maps):
        a, b = read_map(old / name)[0], read_map(new / name)[0]
        res[f"map {name}"] = float(np.abs(b - a).max() / np.abs(a).max())
    for job, star in (("refine", "run_data.star"), ("classify", "run_it003_data.star")):
        e = pose_errors(read_poses(new / job / star), read_poses(old / job / star))
        res[f"{job} max angle difference (deg)"] = float(np.max(e["angle_deg"]))
        res[f"{job} max offset difference (A)"] = float(np.max(e["shift_angst"]))
    ca = starfile.read(old / "classify" / "run_it003_data.star")["particles"]["rlnClassNumber"].to_numpy()
    cb = starfile.read(new / "classify" / "run_it003_data.star")["particles"]["rlnClassNumber"].to_numpy()
    res["classify particles in another class"] = int((ca != cb).sum())
    res["pass"] = bool(
        all(v <= 1e-5 for k, v in res.items() if k.startswith("map "))
        and all(v <= 1e-3 for k, v in res.items() if "angle" in k)
        and all(v <= 1e-4 for k, v in res.items() if "offset" in k)
        and res["classify particles in another class"] == 0
    )
    del torch
    return res


def make_data(work: Path) -> Path:
    """The simulated set (once per workdir): particles without poses and the truth low-passed to 30 Å."""
    data = work / "data"
    if (data / "particles_noposes.star").exists():
        return data
    simulate = ["simulate", "--o", str(data), "--n", "300", "--box", "48", "--angpix", "4.5", "--snr", "0.1"]
    subprocess.run(
        [sys.executable, "-m", "cryorefine.cli.main", *simulate, "--seed", "11"], check=True, capture_output=True
    )
    import torch

    from cryorefine.fourier.filters import low_pass_filter
    from cryorefine.io.mrc import read_map, write_map

    t, angpix = read_map(data / "truth.mrc")
    write_map(data / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, angpix).float().numpy(), angpix)
    return data


def parity(old: str, new: str, work: Path, gpu: bool = False, deterministic: bool = False) -> dict:
    """Both versions on the same data in ``work``; the comparison of ``compare``."""
    data = make_data(work)
    return compare(*(run_at(c, work, data, gpu, deterministic) for c in (old, new)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old"), ap.add_argument("new"), ap.add_argument("out")
    ap.add_argument("--gpu", action="store_true"), ap.add_argument("--workdir", default=None)
    ap.add_argument("--deterministic", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="parity-"))
    res = {"old": a.old, "new": a.new, "device": "gpu" if a.gpu else "cpu", "deterministic": a.deterministic}
    res |= parity(a.old, a.new, work, a.gpu, a.deterministic)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
