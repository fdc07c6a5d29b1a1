"""Issue 21's streaming check: a set larger than the GPU's image cache, streamed from the stacks, against the same
set kept in the cache and pre-read into host memory: particle-iterations per second and the host's peak memory.

One simulated set (the packaged 6msm model, --n particles of --box px at SNR 0.1), class3d K=1 from
particles_noposes.star for --iter iterations, run in a subprocess per mode so each has its own peak RSS:
  cached     the default (the whole set fits the cache: 25 % of the GPU)
  streamed   --gpu_memory small enough that the cache holds --cached_share of the set (the rest read every iteration)
  nocache    --no_image_cache (every image read from the stacks in every iteration)
  preread    --preread_images --no_image_cache (every image from host memory)
Particle-iterations per second count iterations 2.. (the first reads everything in every mode). Host memory: the
peak RSS and the peak anonymous memory (RssAnon, sampled); RSS also counts the touched pages of the memory-mapped
stacks, which belong to the page cache, so run twice with different --n (and --work) to see what grows with the set.
On the CPU there is no image cache: every mode but preread streams from the stacks. Results in
OUTDIR/streaming.{json,md} with the device, date, commit and command.

usage: python bench/streaming.py OUTDIR [--n 40000] [--box 128] [--iter 4] [--modes cached,streamed,nocache,preread]
       [--gpu_memory 6] [--work /tmp/streaming]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cryorefine.density import atoms_to_map, model_radius_angst, packaged_model, read_atoms
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.simulate import simulate_particles

ANGPIX = 1.5


def build(root: Path, n: int, box: int) -> float:
    xyz, w = read_atoms(packaged_model())
    diameter = min(2 * model_radius_angst(xyz) + 10.0, 0.95 * box * ANGPIX)
    if not (root / "data" / "particles_noposes.star").exists():
        device = "cuda" if torch.cuda.is_available() else None
        simulate_particles(atoms_to_map(xyz, w, box, ANGPIX, 50.0), ANGPIX, root / "data", n, snr=0.1, seed=5,
                           device=device)  # fmt: skip
        t = torch.from_numpy(read_map(root / "data" / "truth.mrc")[0]).double()
        write_map(root / "start.mrc", low_pass_filter(t, 30.0, ANGPIX).float().numpy(), ANGPIX)
    return diameter


# The child's peak anonymous memory (RssAnon, sampled every 50 ms): what the run itself holds. Its peak RSS also counts
# the pages of the memory-mapped stacks it has read, which are the kernel's page cache (reclaimable, not the run's).
PEAK_MEMORY = (
    "import re, resource, sys, threading, time\n"
    "peak = [0]\n"
    "def _sample():\n"
    "    while True:\n"
    "        m = re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read())\n"
    "        peak[0] = max(peak[0], int(m.group(1)) if m else 0)\n"
    "        time.sleep(0.05)\n"
    "threading.Thread(target=_sample, daemon=True).start()\n"
)


def run(root: Path, mode: str, n: int, diameter: float, iterations: int, gpu_memory: float) -> dict:
    out = root / mode / "run"
    flags = {"cached": [], "streamed": ["--gpu_memory", str(gpu_memory)], "nocache": ["--no_image_cache"],
             "preread": ["--preread_images", "--no_image_cache"]}[mode]  # fmt: skip
    gpu = ["--gpu"] if torch.cuda.is_available() else []
    argv = [sys.executable, "-c", PEAK_MEMORY + "from cryorefine.cli.main import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "print('anon_kib', peak[0]); sys.exit(rc)",
            "classify", "--i", str(root / "data" / "particles_noposes.star"), "--o", str(out), "--ref",
            str(root / "start.mrc"), "--K", "1", "--iter", str(iterations), "--particle_diameter", f"{diameter:.0f}",
            "--ini_high", "30", "--healpix_order", "2", "--offset_range", "5", "--offset_step", "2", "--ctf", "--pad",
            "2", *gpu, *flags]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True)
    result = {"mode": mode, "rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "flags": flags}
    rss = re.findall(r"maxrss_kib (\d+)", p.stdout)
    result["host_peak_gib"] = round(int(rss[-1]) / 2**20, 2) if rss else None
    anon = re.findall(r"anon_kib (\d+)", p.stdout)
    result["host_peak_anon_gib"] = round(int(anon[-1]) / 2**20, 3) if anon else None
    log = (out.parent / "run.log").read_text() if (out.parent / "run.log").exists() else ""
    seconds = [float(s) for s in re.findall(r"\] iter +\d+:.*?, ([\d.]+) s \[", log)]
    result["iteration_s"] = seconds
    cache = re.findall(r"GPU image cache: (\d+) of (\d+)", log)
    result["cached_images"] = [int(c) for c in cache[-1]] if cache else None
    if len(seconds) > 1:
        result["particle_iterations_per_s"] = round(n * (len(seconds) - 1) / sum(seconds[1:]), 1)
    if p.returncode:
        result["error"] = p.stderr.strip().splitlines()[-1:] or p.stdout.strip().splitlines()[-1:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--iter", type=int, default=4)
    ap.add_argument("--modes", default="cached,streamed,nocache,preread")
    ap.add_argument("--gpu_memory", type=float, default=6.0, help="the streamed mode's cap (GiB)")
    ap.add_argument("--work", default="/tmp/streaming")
    a = ap.parse_args()
    root, outdir = Path(a.work), Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    diameter = build(root, a.n, a.box)
    runs = []
    for mode in a.modes.split(","):
        runs.append(run(root, mode, a.n, diameter, a.iter, a.gpu_memory))
        print(json.dumps(runs[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit, "device": device,
              "command": " ".join(["python", *sys.argv]), "n": a.n, "box": a.box, "runs": runs}  # fmt: skip
    (outdir / "streaming.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Streaming ({result['date']}, {device}, commit {commit})", "", f"`{result['command']}`", "",
             "| mode | rc | images in the GPU cache | particle-iterations/s (its 2..) | host peak RSS GiB | "
             "host peak anonymous GiB | wall s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        cached = "/".join(map(str, r["cached_images"])) if r["cached_images"] else ""
        lines.append(f"| {r['mode']} | {r['rc']} | {cached} | {r.get('particle_iterations_per_s', '')} | "
                     f"{r['host_peak_gib']} | {r['host_peak_anon_gib']} | {r['seconds']} |")  # fmt: skip
    (outdir / "streaming.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
