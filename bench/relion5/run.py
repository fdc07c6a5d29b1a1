#!/usr/bin/env python3
"""Issue 23's RELION-5 beside ours, step 3 of 3: RELION's relion_refine on one of paper_bench.py's sets, from the same
particles (particles_noposes.star: no true angles or offsets), the same starting map and the same flags as our run
of that set (ours add paper_bench.AS_RELION5, which are RELION-5's defaults and are not passed here), clean start, so
that paper_bench.py's report quotes this measured run instead of README figures.

usage: python bench/relion5/run.py SET [--workdir W] [--relion BIN_DIR] [--ranks 3] [--threads 6] [--no_gpu]
                                       [--budget S] [--out DIR]

Runs `mpirun -n RANKS relion_refine_mpi` (auto-refine splits random halves only under MPI; 3 ranks = a master and
two workers sharing the GPU, as RELION-5's published figures) in W/SET/relion5/, with the set's flags plus
--ctf_corrected_ref (the start is a low-passed density, not a reconstruction from CTF-affected images; our refine
reads it the same way), --j THREADS, --dont_combine_weights_via_disc and --gpu. A run already there is replaced.
Writes W/SET/relion5/relion5.json (read by paper_bench.py's report) and OUT/<date>-<device>-SET-relion5.json: wall
time, per-iteration times (from the optimiser files' times), iterations, resolution (FSC 0.143 of the final
model.star, else the last iteration's rlnCurrentResolution), status, command, RELION version, device.
With --relion pointing at Debian's /usr/bin and --no_gpu it runs RELION 3.1.3 on the CPU (how this script is tested
on a machine without a GPU, on the tiny set; RELION 3.1.3 then runs its gridding iterations, which ours skip).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import paper_bench as pb  # noqa: E402  (the sets, their flags and data live there)


def relion_argv(s: pb.BenchSet, p: pb.Paths, out_root: Path, threads: int, gpu: bool) -> list[str]:
    """relion_refine_mpi's arguments for set ``s``: our flags, RELION's resource flags."""
    job = ["--auto_refine", "--split_random_halves"] if s.job == "refine" else []
    flags = [f for f in s.flags if f not in job]
    argv = ["--i", str(p.data / "particles_noposes.star"), "--o", str(out_root), "--ref", str(p.init), *job, *flags]
    argv += ["--ctf_corrected_ref", "--j", str(threads), "--dont_combine_weights_via_disc"]
    return argv + (["--gpu", ""] if gpu else [])


def iteration_times(out_root: Path, started: float) -> list[float]:
    """Seconds of each iteration: the gaps between the optimiser files RELION writes at the end of each."""
    files = sorted(Path(out_root.parent).glob(f"{out_root.name}_it[0-9][0-9][0-9]_optimiser.star"))
    stamps = [started] + [f.stat().st_mtime for f in files if not f.name.endswith("_it000_optimiser.star")]
    return [round(b - a, 1) for a, b in zip(stamps, stamps[1:])]


def final_resolution(s: pb.BenchSet, out_root: Path) -> float | None:
    """Å: the final model.star's FSC 0.143 (auto-refine), else the last iteration's rlnCurrentResolution."""
    final = pb.model_star_fsc(Path(f"{out_root}_model.star")) if s.job == "refine" else None
    if final and final.get("fsc0143_angst"):
        return round(final["fsc0143_angst"], 2)
    models = sorted(out_root.parent.glob(f"{out_root.name}_it[0-9][0-9][0-9]_*model.star"))
    if not models:
        return None
    m = re.search(r"_rlnCurrentResolution\s+(\S+)", models[-1].read_text())
    return round(float(m.group(1)), 2) if m else None


def mpirun(relion_bin: Path) -> list[str]:
    """The MPICH mpirun that build.sh unpacked beside RELION's tree, else the one on PATH; Open MPI (Debian's) runs
    as root and more ranks than cores only when told."""
    mpich = sorted(relion_bin.parent.parent.parent.glob("mpich-*/bin/mpirun"))
    exe = str(mpich[-1]) if mpich else shutil.which("mpirun") or "mpirun"
    v = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return [exe, "--allow-run-as-root", "--oversubscribe"] if "Open MPI" in v.stdout + v.stderr else [exe]


def run_within(cmd: list[str], cwd: Path, log, budget_s: float) -> int | None:
    """Run ``cmd`` in its own process group; return its exit status, or None past ``budget_s``. Whatever of the group
    is left when it returns or is stopped (mpirun's ranks, which would otherwise keep the GPU busy) is killed: past
    the budget SIGTERM first and SIGKILL after a grace of 10 s, SIGKILL in any case at the end."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def signal_group(sig) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    try:
        return proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        return None
    finally:
        signal_group(signal.SIGKILL)
        proc.wait()


def relion_version(binary: Path) -> str:
    try:
        p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [x for x in (p.stdout + p.stderr).splitlines() if "RELION" in x.upper()]
    return lines[0].strip() if lines else "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set", choices=sorted(pb.SETS))
    ap.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR", "/tmp/cryobench"))
    ap.add_argument("--relion", default=os.environ.get("RELION5_BIN", "/tmp/relion5/relion/build/bin"))
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--no_gpu", action="store_true")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds RELION may run before it is stopped")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE.parent / "results"))
    a = ap.parse_args(argv)
    s, gpu = pb.SETS[a.set], not a.no_gpu
    p = pb.Paths(a.workdir, s)
    binary = Path(a.relion) / "relion_refine_mpi"
    if not binary.exists():
        print(f"no {binary}: build it with bench/relion5/build.sh or give --relion", file=sys.stderr)
        return 2
    pb.build(s, p, gpu)
    work = p.root / "relion5"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out_root = work / "run"
    cmd = [*mpirun(Path(a.relion)), "-n", str(a.ranks), str(binary), *relion_argv(s, p, out_root, a.threads, gpu)]
    pb.log(f"{s.name}: {' '.join(cmd)}")
    t0 = time.time()
    with open(work / "relion.log", "w") as logf:
        rc = run_within(cmd, p.data, logf, a.budget)
        status = f"stopped after {a.budget:.0f} s" if rc is None else "finished" if rc == 0 else f"exited {rc}"
    wall = time.time() - t0
    per = iteration_times(out_root, t0)
    if s.job == "refine" and rc == 0:
        status = "converged" if Path(f"{out_root}_class001.mrc").exists() else status
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": pb.device_name() if gpu else "cpu",
        "relion": relion_version(binary),
        "command": " ".join(cmd),
        "ranks": a.ranks,
        "threads": a.threads,
        "rc": rc,
        "status": status,
        "wall_s": round(wall, 1),
        "iterations": len(per),
        "iteration_times_s": per,
        "resolution_angst": final_resolution(s, out_root),
    }
    if s.job == "class3d" and per:
        result["iteration_s"] = round(sum(per) / len(per), 1)
    pb.write_json(work / "relion5.json", result)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pb.write_json(out / f"{result['date']}-{pb.device_slug(result['device'])}-{s.name}-relion5.json", result)
    pb.log(f"{s.name}: RELION {status} in {wall:.1f} s, {len(per)} iterations, {result['resolution_angst']} Å")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
