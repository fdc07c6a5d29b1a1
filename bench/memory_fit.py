"""Issue 21's device check: do big-box jobs fit ordinary GPUs (--gpu_memory GiB), with the same answer as uncapped?

Jobs (the packaged 6msm model, simulated on the GPU at SNR --snr, each run from particles_noposes.star and the truth
low-passed to 30 Å, --pad 2):
  refine450   auto-refine, box 450 at 1.2 Å/px, --n particles (bench/optics_fidelity.py's flags)
  class360    class3d K=6, box 360 at 1.34 Å/px, --n particles (bench/paper_bench.py's EMPIAR-10028-like flags)
Each job runs once per --caps entry (0 = the whole card) in this process. Per run: wall time, the gold-standard (or
best class's) resolution and its shell, each stage's peak of torch.cuda.max_memory_allocated (the largest over the
iterations), run.log's memory plan per iteration; against the uncapped run: the share of particles whose best pose
(angles within 0.01°, offsets within 0.01 Å, class) is the same after iteration 1 (one E-step from the same start)
and after the last. Results in OUTDIR/memory-fit-JOB.{json,md} with the device, date, commit and command.

usage: python bench/memory_fit.py OUTDIR --job refine450|class360 [--caps 0,16] [--n 1500] [--snr 0.1]
       [--iter 25] [--work /tmp/memory_fit]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import starfile
import torch

from cryorefine.cli.main import main as cli
from cryorefine.density import atoms_to_map, model_radius_angst, packaged_model, read_atoms
from cryorefine.evaluation import map_resolution
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.refine.timing import StageTimer
from cryorefine.simulate import simulate_particles

sys.path.insert(0, str(Path(__file__).parent))
from optics_fidelity import flags as refine_flags  # noqa: E402  (the same refinement)
from paper_bench import class3d_flags  # noqa: E402

JOBS = {"refine450": (450, 1.2), "class360": (360, 1.34)}
GIB = float(1 << 30)
CUDA = torch.cuda.is_available()  # without it (a smoke run of the script): no --gpu, caps or peaks


def build(root: Path, box: int, angpix: float, n: int, snr: float) -> float:
    """The job's particles and start (once); returns the particle diameter (Å)."""
    xyz, w = read_atoms(packaged_model())
    diameter = min(2 * model_radius_angst(xyz) + 10.0, 0.95 * box * angpix)
    if not (root / "data" / "particles_noposes.star").exists():
        truth = atoms_to_map(xyz, w, box, angpix, 50.0)
        simulate_particles(truth, angpix, root / "data", n, snr=snr, seed=7, device="cuda" if CUDA else None)
        t = torch.from_numpy(read_map(root / "data" / "truth.mrc")[0]).double()
        write_map(root / "start.mrc", low_pass_filter(t, 30.0, angpix).float().numpy(), angpix)
    return diameter


@contextmanager
def stage_peaks(peaks: dict):
    """StageTimer's stages record the GPU's peak allocation inside them (the largest over the run) into ``peaks``."""
    if not CUDA:
        yield
        return
    original = StageTimer.__call__

    @contextmanager
    def timed(self, name):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with original(self, name):
            yield
        torch.cuda.synchronize()
        peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / GIB)

    StageTimer.__call__ = timed
    try:
        yield
    finally:
        StageTimer.__call__ = original


def run(root: Path, job: str, cap: float, diameter: float, iterations: int, angpix: float) -> dict:
    out = root / f"cap{cap:g}" / "run"
    data = root / "data" / "particles_noposes.star"
    common = ["--i", str(data), "--o", str(out), "--ref", str(root / "start.mrc")] + (["--gpu"] if CUDA else [])
    if cap and CUDA:
        common += ["--gpu_memory", str(cap)]
    if job == "refine450":
        argv = ["refine", *common, *refine_flags(diameter, [])]
    else:
        argv = ["classify", *common, *class3d_flags(round(diameter), n_iter=iterations)]
    peaks: dict = {}
    if CUDA:
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    with stage_peaks(peaks):
        rc = cli(argv)
    seconds = time.perf_counter() - t0
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)  # the next run's cap is its own
    result = {"cap_gib": cap, "rc": rc, "seconds": round(seconds, 1), "argv": argv,
              "peak_gib": {k: round(v, 2) for k, v in peaks.items()}}  # fmt: skip
    log = (out.parent / "run.log").read_text().splitlines()
    plan = [line.split("]; ", 1)[1].split(" — ")[0] for line in log if "padded voxels" in line and "]; " in line]
    result["memory_plan"] = plan
    result["iterations"] = len([line for line in log if "] iter " in line])
    if rc != 0:
        return result
    if job == "refine450":
        h1, h2 = (torch.from_numpy(read_map(f"{out}_half{h}_class001_unfil.mrc")[0]) for h in (1, 2))
        gold = map_resolution(h1, h2, angpix)["resolution_angst"][0.143]
        result["gold_standard_angst"] = round(gold, 3)
        result["gold_shell"] = round(h1.shape[0] * angpix / gold, 2)
    result["log_resolution"] = [line.split("resolution ")[1].split(" Å")[0] for line in log if "] iter " in line]
    return result


def poses(star: Path) -> dict:
    p = starfile.read(star)
    p = p["particles"] if isinstance(p, dict) else p
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    out = {c: p[c].to_numpy() for c in cols}
    out["class"] = p["rlnClassNumber"].to_numpy() if "rlnClassNumber" in p else np.zeros(len(p))
    return out


def same_pose_share(a: Path, b: Path) -> float:
    """Share of particles with the same best pose in two data.star files (angles mod 360 within 0.01°, offsets within
    0.01 Å, the same class)."""
    pa, pb = poses(a), poses(b)
    same = pa["class"] == pb["class"]
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        d = np.abs((pa[c] - pb[c] + 180.0) % 360.0 - 180.0)
        same &= d < 0.01
    for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
        same &= np.abs(pa[c] - pb[c]) < 0.01
    return float(same.mean())


def compare(root: Path, caps: list[float], runs: dict) -> None:
    """Same-pose shares of each capped run against the uncapped one, after iteration 1 and the last iteration."""
    base = root / "cap0"
    if 0 not in runs or runs[0]["rc"] != 0:  # the uncapped run comes later (or failed): nothing to compare yet
        return
    for cap in caps:
        if cap == 0 or runs[cap]["rc"] != 0:
            continue
        here = root / f"cap{cap:g}"
        first = sorted(base.glob("run_it001_data.star"))
        if first:
            runs[cap]["same_pose_it1"] = same_pose_share(first[0], here / "run_it001_data.star")
        last = sorted(base.glob("run_it*_data.star"))[-1].name
        if (here / last).exists():
            runs[cap]["same_pose_last"] = same_pose_share(base / last, here / last)
        if runs[0]["seconds"]:
            runs[cap]["time_ratio"] = round(runs[cap]["seconds"] / runs[0]["seconds"], 2)


def write(outdir: Path, job: str, meta: dict, runs: dict) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit or "unknown",
              "device": device, "command": " ".join(["python", *sys.argv]), "job": job, "set": meta,
              "runs": {f"{c:g}": r for c, r in runs.items()}}  # fmt: skip
    (outdir / f"memory-fit-{job}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Memory fit: {job} ({result['date']}, {device}, commit {result['commit']})", "",
             f"`{result['command']}`; set {json.dumps(meta)}", "",
             "| --gpu_memory | rc | s | ratio | iterations | resolution (Å, last iteration) | gold-standard (Å) | "
             "same pose it 1 | same pose last | peak GiB per stage |", "|---" * 10 + "|"]  # fmt: skip
    for cap, r in runs.items():
        peaks = ", ".join(f"{k} {v}" for k, v in r.get("peak_gib", {}).items())
        lines.append(
            f"| {cap:g} | {r['rc']} | {r['seconds']} | {r.get('time_ratio', '')} | {r.get('iterations', '')} | "
            f"{(r.get('log_resolution') or [''])[-1]} | {r.get('gold_standard_angst', '')} | "
            f"{r.get('same_pose_it1', '')} | {r.get('same_pose_last', '')} | {peaks} |"
        )
    lines += ["", "Memory plan per iteration (run.log):", ""]
    for cap, r in runs.items():
        lines += [f"- {cap:g}: " + " / ".join(r.get("memory_plan", [])[-3:])]
    (outdir / f"memory-fit-{job}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--job", choices=sorted(JOBS), required=True)
    ap.add_argument("--caps", default="0,16")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--work", default="/tmp/memory_fit")
    ap.add_argument("--box", type=int, default=0, help="another box (a smoke run)")
    ap.add_argument("--angpix", type=float, default=0.0, help="another pixel size (Å)")
    a = ap.parse_args()
    box, angpix = a.box or JOBS[a.job][0], a.angpix or JOBS[a.job][1]
    root = Path(a.work) / a.job
    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    diameter = build(root, box, angpix, a.n, a.snr)
    meta = {"box": box, "angpix": angpix, "n": a.n, "snr": a.snr, "pad": 2, "diameter": round(diameter, 1),
            "build_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    caps = [float(c) for c in a.caps.split(",")]
    runs = {}
    for cap in caps:
        runs[cap] = run(root, a.job, cap, diameter, a.iter, angpix)
        print(json.dumps({k: v for k, v in runs[cap].items() if k != "argv"}), flush=True)
        compare(root, caps[: caps.index(cap) + 1], runs)
        write(outdir, a.job, meta, runs)


if __name__ == "__main__":
    main()
