"""cryorefine's side of the fidelity comparison on one set of bench/fidelity_sets.py: auto-refine with the flags of
bench/relion_fidelity.sh (the same particles without poses, start, half sets and flags), then the judgement of
bench/compare_refine.py (one FSC tool on the unfiltered halves and against the truth, pose errors modulo the point
group, iterations, last HEALPix order) and the run's STAR files packed for bench/trajectory.py.

usage: python bench/fidelity_ours.py SETDIR OUTDIR [--gpu] [--j N] [--check FINGERPRINTS.json]
Writes OUTDIR/<set>-ours.json (judgement, wall time, device) and OUTDIR/<set>-ours-stars.tar.xz (run_it*_*.star,
run_*.star, run.log). --check compares the set's image fingerprint with one recorded where RELION ran (same data).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_refine import judge  # noqa: E402

from cryorefine.cli.main import main as cli  # noqa: E402


def relion_flags(meta: dict, seed: int = 0) -> list[str]:
    """bench/relion_fidelity.sh's flags, in our CLI (its SEED is --random_seed)."""
    return [
        "--ini_high",
        str(meta["ini_high"]),
        "--particle_diameter",
        str(meta["particle_diameter"]),
        "--sym",
        meta["sym"],
        "--healpix_order",
        "2",
        "--auto_local_healpix_order",
        "3",
        "--offset_range",
        "5",
        "--offset_step",
        "2",
        "--low_resol_join_halves",
        "40",
        "--norm",
        "--scale",
        "--flatten_solvent",
        "--zero_mask",
        "--ctf",
        "--pad",
        "2",
        "--random_seed",
        str(seed),
    ]


def check_fingerprint(setdir: Path, meta: dict, recorded: dict) -> dict:
    """Image 1's mean/std/sum here against the recorded ones (float32 FFTs may differ in the last bits between
    machines)."""
    mine, theirs = meta["fingerprint"], recorded[meta["name"]]
    diff = {
        k: abs(mine[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in ("image1_mean", "image1_std", "image1_sum")
    }
    if max(diff.values()) > 1e-4:
        raise SystemExit(f"{setdir}: not the data RELION refined (relative differences {diff})")
    return diff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("setdir"), ap.add_argument("outdir")
    ap.add_argument("--gpu", action="store_true"), ap.add_argument("--j", type=int, default=0)
    ap.add_argument("--check", default=None, help="JSON of {set: fingerprint} recorded where RELION ran")
    ap.add_argument("--label", default="ours")
    ap.add_argument("--seed", type=int, default=0, help="--random_seed (run-to-run scatter)")
    a = ap.parse_args()
    setdir, out = Path(a.setdir), Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((setdir / "set.json").read_text())
    check = check_fingerprint(setdir, meta, json.loads(Path(a.check).read_text())) if a.check else None
    root = setdir / a.label / "run"
    argv = [
        "refine",
        "--i",
        str(setdir / "particles.star"),
        "--o",
        str(root),
        "--ref",
        str(setdir / "start.mrc"),
        *relion_flags(meta, a.seed),
    ]
    argv += ["--gpu"] if a.gpu else ["--j", str(a.j)]
    t0 = time.perf_counter()
    rc = cli(argv)
    wall = time.perf_counter() - t0
    res = {
        "set": meta["name"],
        "rc": rc,
        "wall_s": round(wall, 1),
        "argv": argv,
        "fingerprint_check": check,
        "device": torch.cuda.get_device_name(0)
        if a.gpu
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
    if rc == 0:
        res.update(judge(str(root), setdir, setdir / "particles_truth.star", meta["sym"]))
    (out / f"{meta['name']}-{a.label}.json").write_text(json.dumps(res, indent=1))
    with tarfile.open(out / f"{meta['name']}-{a.label}-stars.tar.xz", "w:xz") as tar:
        for f in sorted(root.parent.glob("run*.star")) + [root.parent / "run.log"]:
            if f.exists():
                tar.add(f, arcname=f.name)
    print(
        json.dumps(
            {
                k: res.get(k)
                for k in (
                    "set",
                    "rc",
                    "wall_s",
                    "gold_standard_0.143_angst",
                    "fsc_to_truth_0.5_angst",
                    "angle_median_deg",
                    "iterations",
                    "last_healpix_order",
                )
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
