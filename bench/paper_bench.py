#!/usr/bin/env python3
"""Paper-sized GPU benchmarks (issue 5): RELION-5's benchmark data sets, our runs with RELION's flags, result files.

usage:
  python bench/paper_bench.py build  SET [--workdir W]
  python bench/paper_bench.py run    SET [--workdir W] [--budget S] [--out DIR] [--cpu_n N] [--no_gpu]
  python bench/paper_bench.py cpu    SET [--workdir W] [--budget S] [--out DIR] [--cpu_n N]
  python bench/paper_bench.py report SET [--workdir W] [--out DIR]

SET: betagal (8,915 particles, box 100), trpv1 (5,000, box 256), trpv1_full (35,645, box 256), empiar10028
(3,000, box 360, class3d K=6 --iter 25); tiny and tiny_class3d are test sets (box 32, 50 particles).

build   make_bench_data.py (pseudo-complex + poses.star) -> `cryorefine simulate --map truth.mrc --poses poses.star
        --snr 0` (on the GPU when there is one; float32 stack streamed to disk) -> add_noise.py STACK 0.05 -> the
        starting reference (truth low-passed to --ini_high). Cached in W/SET/data (skipped when build.json is there).
run     build if needed, then our auto-refine / class3d with the flags of /work/shared/bench/README.md (C1,
        --random_seed 0, --pool 30, --oversampling 1, refine --low_resol_join_halves 0, --gpu) and RELION-5's
        reconstruction (AS_RELION5: --skip_gridding, its default since 4.0; ours is RELION 3.1's), in this process, with
        --max_seconds so that it stops cleanly within --budget (seconds of this call, build included); a later call
        continues from the last finished iteration (--continue). When it has finished and time is left: the CPU path
        on the first --cpu_n particles, one iteration (a subprocess without CUDA). Then `report`.
cpu     only the CPU subset (then `report`).
report  W/SET -> OUT/<date>-<device>-<set>.md and .json (+ OUT/<date>-<device>-<set>-run.tgz: logs and final STARs).
        Per iteration: wall time, stage times (the timer's getFourierTransformsAndCTFs, getAllSquaredDifferences,
        convertAllDiff2ToWeights = RELION's convertAllSquaredDifferencesToWeights, storeWeightedSums, M-step),
        gold-standard resolution (FSC 0.143 of the unfiltered half maps, our FSC), mean rlnNrOfSignificantSamples,
        coarse-pass GEMM FLOPs / coarse-pass time; at the end FSC-to-truth 0.5 and pose errors; peak GPU memory and
        host RSS per call; a cuBLAS reference rate (torch.matmul on the logged coarse GEMM shapes, same process);
        GPU/CPU per-particle-iteration ratio; RELION-5's H100 figures beside ours.

The work folder (default /tmp/cryobench) lives on the machine's disk: data and runs persist between calls while the
machine stays warm, and are rebuilt (same seeds, same data) on a fresh one. Old iterations' _state.pt files (and, for
class3d, old class maps) are deleted while the run goes, so a 25-iteration K=6 box-360 run fits the disk.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = REPO / "src"
if str(SRC) not in sys.path and not os.environ.get("PAPER_BENCH_NO_SRC"):
    sys.path.insert(0, str(SRC))

SNR = 0.05
STAGES = [
    "getFourierTransformsAndCTFs",
    "getAllSquaredDifferences",
    "convertAllDiff2ToWeights",
    "storeWeightedSums",
    "M-step",
]
STAGE_LABEL = {"convertAllDiff2ToWeights": "convertAllSquaredDifferencesToWeights"}
ESTEP_PER_PARTICLE = ["getAllSquaredDifferences", "convertAllDiff2ToWeights", "storeWeightedSums"]

# Peak dense rates (TFLOP/s) from NVIDIA's data sheets: FP32 on the CUDA cores, TF32 on the tensor cores (no sparsity),
# and the memory bandwidth (TB/s).
PEAKS = [  # (substring of torch.cuda.get_device_name, label, fp32, tf32, hbm)
    ("H100 PCIe", "H100 PCIe", 51.2, 378.0, 2.0),
    ("H100 NVL", "H100 NVL", 60.0, 417.5, 3.9),
    ("H100", "H100 SXM5", 66.9, 494.7, 3.35),
    ("H200", "H200 SXM", 66.9, 494.7, 4.8),
    ("A100", "A100", 19.5, 156.0, 2.0),
]
# the stage whose memory traffic each counter of bytes (timer.add_bytes) counts
STAGE_BYTES = {"getFourierTransformsAndCTFs": "images", "convertAllDiff2ToWeights": "weights"}


def refine_flags(diameter, ini_high=40, **over):
    f = {
        "--healpix_order": 2,
        "--auto_local_healpix_order": 4,
        "--offset_range": 5,
        "--offset_step": 2,
        "--particle_diameter": diameter,
        "--ini_high": ini_high,
        "--pad": 2,
        "--sym": "C1",
        "--random_seed": 0,
        "--pool": 30,
        "--oversampling": 1,
        "--low_resol_join_halves": 0,
    }
    f.update(over)
    return [
        "--auto_refine",
        "--split_random_halves",
        "--ctf",
        "--flatten_solvent",
        "--zero_mask",
        "--norm",
        "--scale",
    ] + [str(x) for kv in f.items() for x in kv]


def class3d_flags(diameter, K=6, n_iter=25, ini_high=60, **over):
    f = {
        "--K": K,
        "--iter": n_iter,
        "--tau2_fudge": 4,
        "--ini_high": ini_high,
        "--healpix_order": 2,
        "--offset_range": 5,
        "--offset_step": 2,
        "--particle_diameter": diameter,
        "--pad": 2,
        "--sym": "C1",
        "--random_seed": 0,
        "--pool": 30,
        "--oversampling": 1,
    }
    f.update(over)
    return ["--firstiter_cc", "--ctf", "--flatten_solvent", "--zero_mask", "--norm", "--scale"] + [
        str(x) for kv in f.items() for x in kv
    ]


@dataclass
class BenchSet:
    name: str
    title: str
    job: str  # refine | class3d
    make: tuple  # make_bench_data.py BOX APIX N COPIES RING_A
    flags: list
    ini_high: float
    cpu_n: int = 200
    model: str | None = None  # BENCH_MODEL (default 6msm)
    snr: float = SNR
    relion: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.make[2])

    @property
    def our_flags(self) -> list:
        """Our runs' flags: the set's, RELION-5's defaults that differ from RELION 3.1's (ours) added."""
        return self.flags + AS_RELION5

    @property
    def max_iter(self) -> int:
        return int(self.flags[self.flags.index("--iter") + 1]) if "--iter" in self.flags else 50


# RELION-5's behaviour where its defaults differ from RELION 3.1's, which our defaults follow (the fidelity runs
# against Debian's RELION 3.1.3): since 4.0 RELION reconstructs without the 10 gridding iterations (its
# --dont_skip_gridding brings them back), so our runs beside its figures do the same. RELION-5 is not given these.
# BENCH_AS_RELION5=0 leaves them out (our defaults: what RELION 3.1's gridding iterations cost).
AS_RELION5 = [] if os.environ.get("BENCH_AS_RELION5") == "0" else ["--skip_gridding"]
RELION_NOTE = "RELION 5.0.1 on one H100 80GB HBM3, 3 MPI ranks x 6 threads (/work/shared/bench/README.md)"
SETS = {
    s.name: s
    for s in [
        BenchSet(
            "betagal",
            "betagal-like auto-refine, 8,915 particles",
            "refine",
            (100, 3.54, 8915, 4, 45),
            refine_flags(265),
            40,
            relion={"wall_s": 366, "iterations": 14, "resolution_angst": 11.1, "status": "converged"},
        ),
        BenchSet(
            "trpv1",
            "TRPV1-like auto-refine, 5,000 particles",
            "refine",
            (256, 1.2156, 5000, 4, 40),
            refine_flags(233),
            40,
            relion={
                "wall_s": 481,
                "iterations": 14,
                "resolution_angst": 6.35,
                "status": "not converged after 481 s",
                "late_iteration_s": 62,
            },
        ),
        BenchSet(
            "trpv1_full",
            "TRPV1-like auto-refine, 35,645 particles",
            "refine",
            (256, 1.2156, 35645, 4, 40),
            refine_flags(233),
            40,
            relion={"status": "not timed (README times the 5,000 subset)"},
        ),
        BenchSet(
            "empiar10028",
            "EMPIAR-10028-like class3d K=6, 3,000 particles",
            "class3d",
            (360, 1.34, 3000, 6, 70),
            class3d_flags(361),
            60,
            cpu_n=100,
            relion={"iteration_s": 54, "iterations": 25, "particle_iterations_per_s": 56},
        ),
        BenchSet(
            "tiny",
            "test set: tiny auto-refine, 40 particles",
            "refine",
            (32, 4.0, 40, 2, 20),
            refine_flags(120, 20, **{"--healpix_order": 1, "--offset_range": 2, "--offset_step": 1, "--iter": 2}),
            20,
            cpu_n=8,
            model="4E43.pdb",
            snr=2.0,
        ),
        BenchSet(
            "tiny_class3d",
            "test set: tiny class3d K=2, 50 particles",
            "class3d",
            (32, 4.0, 50, 2, 20),
            class3d_flags(120, K=2, n_iter=2, **{"--healpix_order": 1, "--offset_range": 2, "--offset_step": 1}),
            60,
            cpu_n=10,
            model="4E43.pdb",
            snr=2.0,
        ),
    ]
}


# ------------------------------------------------------------------ small helpers
def child_env(**extra) -> dict:
    """The environment for our subprocesses: this repository's src first on PYTHONPATH."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    return env


def log(msg: str) -> None:
    print(f"[paper_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_json(path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def device_slug(name: str) -> str:
    if name == "cpu":
        return "cpu"
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", ""))[:12] or "gpu").lower()


def git_commit() -> dict:
    env = os.environ.get("BENCH_COMMIT")
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return {"commit": sha or env or "unknown", "dirty": bool(dirty)}


def gemm_flops(key: str) -> float:
    kind, dims = key.split(":")
    d = [int(x) for x in dims.split("x")]
    return 2.0 * d[0] * d[1] * d[2] * (d[3] if kind == "bmm" else 1)


def peak_for(name: str):
    for sub, label, fp32, tf32, hbm in PEAKS:
        if sub in name:
            return {"card": label, "fp32_tflops": fp32, "tf32_tflops": tf32, "hbm_tbps": hbm}
    return None


class Paths:
    def __init__(self, workdir, s: BenchSet):
        self.root = Path(workdir) / s.name
        self.data = self.root / "data"
        self.run_dir = self.root / "run"
        self.run_root = self.run_dir / "run"
        self.cpu_dir = self.root / "cpu"
        self.calls = self.root / "calls.json"
        self.fsc_cache = self.root / "fsc_cache.json"
        self.init = self.data / f"init{int(s.ini_high)}.mrc"


def iterations_done(root) -> list[int]:
    return sorted(
        int(m.group(1))
        for f in glob.glob(f"{root}_it[0-9][0-9][0-9]_optimiser.star")
        if (m := re.search(r"_it(\d{3})_optimiser", f))
    )


def load_state(root, it: int) -> dict | None:
    import torch

    path = Path(f"{root}_it{it:03d}_state.pt")
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (TypeError, RuntimeError):
        return torch.load(path, map_location="cpu", weights_only=False)


def is_finished(s: BenchSet, p: Paths) -> bool:
    if s.job == "refine":
        return Path(f"{p.run_root}_class001.mrc").exists()
    done = iterations_done(p.run_root)
    return bool(done) and done[-1] >= s.max_iter


# ------------------------------------------------------------------ build
def build(s: BenchSet, p: Paths, gpu: bool) -> dict:
    info = read_json(p.data / "build.json")
    if (
        info
        and info.get("make") == list(s.make)
        and info.get("snr") == s.snr
        and (p.data / "particles.star").exists()
        and p.init.exists()
    ):
        log(f"{s.name}: data cached in {p.data}")
        return info
    if p.data.exists():
        shutil.rmtree(p.data)
    p.data.mkdir(parents=True)
    env = child_env()
    if s.model:
        env["BENCH_MODEL"] = str(SRC / "cryorefine" / "data" / s.model)
    py = sys.executable
    steps = {}

    def step(name, cmd, cwd):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed ({' '.join(map(str, cmd))}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        steps[name] = {
            "cmd": " ".join(str(c) for c in cmd),
            "seconds": round(time.perf_counter() - t0, 2),
            "output": r.stdout.strip()[-500:],
        }
        log(f"{s.name}: {name} {steps[name]['seconds']} s: {steps[name]['output'][-200:]}")

    step("make_bench_data", [py, str(HERE / "make_bench_data.py"), ".", *map(str, s.make)], p.data)
    sim = [
        py,
        "-m",
        "cryorefine.cli.main",
        "simulate",
        "--map",
        "truth.mrc",
        "--poses",
        "poses.star",
        "--o",
        ".",
        "--snr",
        "0",
    ]
    step("project", sim + (["--gpu"] if gpu else []), p.data)
    step("add_noise", [py, str(HERE / "add_noise.py"), "particles.mrcs", str(s.snr)], p.data)
    t0 = time.perf_counter()
    import torch

    from cryorefine.fourier.filters import low_pass_filter
    from cryorefine.io.mrc import read_map, write_map

    truth, angpix = read_map(p.data / "truth.mrc")
    dev = "cuda" if gpu else "cpu"
    init = low_pass_filter(torch.from_numpy(truth).double().to(dev), s.ini_high, angpix).float().cpu().numpy()
    write_map(p.init, init, angpix)
    steps["reference"] = {
        "cmd": f"truth.mrc low-passed to {s.ini_high:g} Å (cryorefine.fourier.filters.low_pass_filter) "
        f"-> {p.init.name}",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    box = int(s.make[0])
    info = {
        "set": s.name,
        "make": list(s.make),
        "model": s.model or "6msm.pdb.bz2",
        "snr": s.snr,
        "box": box,
        "angpix": float(s.make[1]),
        "n": s.n,
        "stack_bytes": (p.data / "particles.mrcs").stat().st_size,
        "steps": steps,
        "projected_on": dev,
        "seconds": round(sum(v["seconds"] for v in steps.values()), 2),
    }
    write_json(p.data / "build.json", info)
    return info


# ------------------------------------------------------------------ runs
class Pruner(threading.Thread):
    """Deletes _state.pt of iterations older than the newest finished one (and, for class3d, their class maps)."""

    def __init__(self, root, class_maps: bool, period: float = 5.0):
        super().__init__(daemon=True)
        self.root, self.class_maps, self.period = str(root), class_maps, period
        self.stop = threading.Event()

    def prune(self) -> None:
        done = iterations_done(self.root)
        if not done:
            return
        for it in done[:-1]:
            pats = [f"{self.root}_it{it:03d}_state.pt"] + (
                [f"{self.root}_it{it:03d}_class[0-9][0-9][0-9].mrc"] if self.class_maps else []
            )
            for pat in pats:
                for f in glob.glob(pat):
                    try:
                        os.remove(f)
                    except OSError:
                        pass

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.prune()


class BusySampler(threading.Thread):
    """Samples how busy the GPU is while a run goes (issue 23: busy ≥ 85 % of the wall time): NVML's utilisation, the
    percentage of the last sample period (1/6 s to 1 s, by the driver) in which a kernel ran, every ``period`` s.
    ``read()`` gives one percentage (torch.cuda.utilization, which asks NVML; None where there is none)."""

    def __init__(self, read, period: float = 0.1):
        super().__init__(daemon=True)
        self.read, self.period = read, period
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            value = self.read()
            if value is None:
                return
            self.samples.append(float(value))

    def mean_percent(self) -> float | None:
        """The mean over the samples: the share of the sampled time the GPU ran a kernel, in percent."""
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def gpu_utilization() -> float | None:
    """NVML's GPU utilisation in percent (torch.cuda.utilization), None without CUDA or NVML."""
    import torch

    try:
        return float(torch.cuda.utilization()) if torch.cuda.is_available() else None
    except Exception:  # pynvml missing or NVML not answering: no samples, the report says so
        return None


def job_argv(
    s: BenchSet, p: Paths, gpu: bool, max_seconds: float | None, cpu_subset: Path | None = None, extra: str = ""
) -> list[str]:
    cmd = "refine" if s.job == "refine" else "classify"
    if cpu_subset is not None:
        out = p.cpu_dir / "run"
        return [
            cmd,
            "--i",
            str(cpu_subset),
            "--o",
            str(out),
            "--ref",
            str(p.init),
            *s.our_flags,
            "--max_seconds",
            "1",
            *extra.split(),
        ]
    done = iterations_done(p.run_root)
    if done:
        argv = [cmd, "--continue", f"{p.run_root}_it{done[-1]:03d}_optimiser.star"]
    else:
        argv = [
            cmd,
            "--i",
            str(p.data / "particles_noposes.star"),
            "--o",
            str(p.run_root),
            "--ref",
            str(p.init),
            *s.our_flags,
        ]
    if gpu:
        argv.append("--gpu")
    if max_seconds:
        argv += ["--max_seconds", f"{max_seconds:g}"]
    return argv + extra.split()


def coarse_precision(argv: list[str]) -> str:
    """The coarse products' precision a run with ``argv`` used, read with cryorefine's own parser: --precision or
    its default (tf32), which is fp32 on the CPU (estep.precision.for_device); "unknown" for a command line that
    cryorefine refused (the call's rc says so)."""
    from cryorefine.cli.main import build_parser
    from cryorefine.estep.precision import for_device

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse's error is already on stderr, from the run itself
        return "unknown"
    return for_device(args.precision, "cuda" if args.gpu is not None else "cpu")


def run_gpu(s: BenchSet, p: Paths, gpu: bool, max_seconds: float, extra: str = "") -> dict:
    import torch

    from cryorefine.cli.main import main as cli
    from cryorefine.refine.timing import seconds_since_process_start

    p.run_dir.mkdir(parents=True, exist_ok=True)
    before = iterations_done(p.run_root)
    argv = job_argv(s, p, gpu, max_seconds, extra=extra)
    log(f"{s.name}: cryorefine {' '.join(argv)}")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:  # matplotlib builds its font cache on a machine's first import (seconds, once per machine): not in the timing
        import cryorefine.report  # noqa: F401
    except ImportError:
        pass
    pruner = Pruner(p.run_root, class_maps=s.job == "class3d")
    pruner.start()
    busy = BusySampler(gpu_utilization if gpu else lambda: None)
    busy.start()
    age = seconds_since_process_start()  # the job runs in this process: its start-up is counted from here
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        rc = cli(argv)
    finally:
        wall = time.perf_counter() - t0
        busy.stop.set()
        busy.join()
        pruner.stop.set()
        pruner.join()
        pruner.prune()
    after = iterations_done(p.run_root)
    call = {
        "started": started,
        "argv": ["cryorefine", *argv],
        "rc": rc,
        "wall_s": round(wall, 2),
        "device": device_name(),
        "iterations": [before[-1] if before else 0, after[-1] if after else 0],
        "finished": is_finished(s, p),
        "precision": coarse_precision(argv),
        "gpu_busy_percent": busy.mean_percent(),
        "process_age_at_call_s": age,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if gpu:
        call.update(
            peak_gpu_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_gpu_reserved_bytes=torch.cuda.max_memory_reserved(),
            gpu_total_bytes=torch.cuda.get_device_properties(0).total_memory,
        )
    write_json(p.calls, calls_with(p, call))
    log(f"{s.name}: call took {wall:.1f} s, iterations {call['iterations']}, finished {call['finished']}")
    return call


def calls_with(p: Paths, call: dict) -> list[dict]:
    """The run's calls with ``call`` added: a call that began at iteration 0 is a clean start, and the calls before it
    belonged to a run that is gone (a run folder removed for a clean start kept them, and the report added their
    wall time to the new run's)."""
    earlier = read_json(p.calls, []) if call["iterations"][0] > 0 else []
    return [*earlier, call]


def run_cpu(s: BenchSet, p: Paths, n: int, timeout: float) -> dict:
    """Our CPU path: the first n particles, one iteration (--max_seconds 1 stops after it), no CUDA, all cores."""
    from cryorefine.io.star import read_star, write_star

    if p.cpu_dir.exists():
        shutil.rmtree(p.cpu_dir)
    p.cpu_dir.mkdir(parents=True)
    blocks = read_star(p.data / "particles.star")
    blocks["particles"] = blocks["particles"].iloc[:n].reset_index(drop=True)
    subset = p.data / f"subset_cpu{n}.star"
    write_star(subset, blocks)
    threads = os.cpu_count() or 1
    argv = [
        sys.executable,
        "-m",
        "cryorefine.cli.main",
        *job_argv(s, p, False, None, cpu_subset=subset),
        "--j",
        str(threads),
    ]
    env = child_env(CUDA_VISIBLE_DEVICES="")
    log(f"{s.name}: CPU subset ({n} particles, {threads} threads, timeout {timeout:.0f} s)")
    t0 = time.perf_counter()
    status = "ok"
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            status = f"failed (rc {r.returncode}): {r.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    out = {"n": n, "threads": threads, "argv": ["cryorefine", *argv[3:]], "status": status, "wall_s": round(wall, 2)}
    st = load_state(p.cpu_dir / "run", 1)
    if st is not None:
        h = st["history"][0]
        out.update(iteration_s=h["seconds"], stages=h["stages"])
    write_json(p.cpu_dir / "cpu.json", out)
    return out


# ------------------------------------------------------------------ report
def gold_fsc(p: Paths, it: int | None, dev) -> dict | None:
    """Gold-standard FSC of the unfiltered half maps (the final ones, or iteration it's if written): resolution at 0.143
    and 0.5. Intermediate iterations write no unfiltered maps (RELION's compareTwoHalves): their FSC is the one in the
    iteration's model.star, from the half sets' Fourier-space averages."""
    import torch

    from cryorefine.evaluation import map_resolution
    from cryorefine.io.mrc import read_map

    pre = f"{p.run_root}_it{it:03d}" if it is not None else str(p.run_root)
    f1, f2 = Path(f"{pre}_half1_class001_unfil.mrc"), Path(f"{pre}_half2_class001_unfil.mrc")
    if not (f1.exists() and f2.exists()):
        return model_star_fsc(Path(f"{pre}_half1_model.star")) if it is not None else None
    cache = read_json(p.fsc_cache, {})
    key = f"{f1.name}:{f1.stat().st_mtime_ns}"
    if key in cache:
        return cache[key]
    (a, angpix), (b, _) = read_map(f1), read_map(f2)
    r = map_resolution(torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev), angpix)["resolution_angst"]
    cache[key] = {"fsc0143_angst": r[0.143], "fsc05_angst": r[0.5]}
    write_json(p.fsc_cache, cache)
    return cache[key]


def model_star_fsc(model_star: Path) -> dict | None:
    """Resolution at FSC 0.143 and 0.5 of a model.star's rlnGoldStandardFsc (None if the file is not there)."""
    import torch

    from cryorefine.io.star import read_star
    from cryorefine.reconstruction.fsc import resolution_angstrom

    if not model_star.exists():
        return None
    blocks = read_star(model_star)
    general, fsc = (
        blocks["model_general"],
        torch.tensor(blocks["model_class_1"]["rlnGoldStandardFsc"].to_numpy(dtype=float)),
    )
    box, angpix = int(general["rlnOriginalImageSize"].iloc[0]), float(general["rlnPixelSize"].iloc[0])
    return {
        "fsc0143_angst": resolution_angstrom(fsc, 0.143, box, angpix),
        "fsc05_angst": resolution_angstrom(fsc, 0.5, box, angpix),
        "of": "Fourier-space FSC of the half sets (model.star)",
    }


def truth_scores(s: BenchSet, p: Paths, history: list, dev) -> dict:
    import numpy as np
    import torch

    from cryorefine.evaluation import map_resolution, pose_errors, read_poses, summarise_pose_errors
    from cryorefine.io.mrc import read_map

    truth, angpix = read_map(p.data / "truth.mrc")
    t = torch.from_numpy(truth).to(dev)
    last = history[-1]["iteration"] if history else None
    out = {}
    if s.job == "refine":
        if Path(f"{p.run_root}_class001.mrc").exists():
            m, label, data = f"{p.run_root}_class001.mrc", "final map (run_class001.mrc)", f"{p.run_root}_data.star"
        else:
            m, label, data = (
                f"{p.run_root}_it{last:03d}_half1_class001.mrc",
                f"iteration {last} half-1 map (not finished)",
                f"{p.run_root}_it{last:03d}_data.star",
            )
        r = map_resolution(torch.from_numpy(read_map(m)[0]).to(dev), t, angpix)["resolution_angst"]
        out["fsc_to_truth"] = {"map": label, "fsc05_angst": r[0.5], "fsc0143_angst": r[0.143]}
    else:
        per = []
        for f in sorted(glob.glob(f"{p.run_root}_it{last:03d}_class[0-9][0-9][0-9].mrc")):
            r = map_resolution(torch.from_numpy(read_map(f)[0]).to(dev), t, angpix)["resolution_angst"]
            per.append({"map": Path(f).name, "fsc05_angst": r[0.5]})
        dist = history[-1].get("class_distribution", []) if history else []
        out["fsc_to_truth"] = {
            "classes": per,
            "class_distribution": dist,
            "best_fsc05_angst": min((c["fsc05_angst"] for c in per), default=None),
            "largest_class_fsc05_angst": per[int(np.argmax(dist))]["fsc05_angst"] if per and dist else None,
        }
        data = f"{p.run_root}_it{last:03d}_data.star"
    if Path(data).exists():
        e = summarise_pose_errors(pose_errors(read_poses(data), read_poses(p.data / "particles.star")))
        out["pose_errors"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()}
        from cryorefine.io.star import read_star

        df = read_star(data)["particles"]
        if "rlnNrOfSignificantSamples" in df:
            out["mean_rlnNrOfSignificantSamples_last"] = float(df["rlnNrOfSignificantSamples"].mean())
    return out


def cublas_reference(shape_flops: dict, top: int = 3) -> dict:
    """torch.matmul / torch.bmm on random float32 tensors of the most FLOP-heavy logged coarse shapes (fp32 as in the
    run, and TF32)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.cuda.empty_cache()
    keys = sorted(shape_flops, key=lambda k: -shape_flops[k])[:top]
    rows = []
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    for key in keys:
        kind, dims = key.split(":")
        d = [int(x) for x in dims.split("x")]
        shp = (d[0], d[1], d[2], d[3]) if kind == "bmm" else (d[0], d[1], d[2])
        elems = (
            (shp[0] * (shp[1] * shp[2] + shp[2] * shp[3] + shp[1] * shp[3]))
            if kind == "bmm"
            else (shp[0] * shp[1] + shp[1] * shp[2] + shp[0] * shp[2])
        )
        if dev == "cuda" and elems * 4 > 0.4 * torch.cuda.mem_get_info()[0]:
            rows.append({"shape": key, "skipped": "too large for free GPU memory"})
            continue
        if kind == "bmm":
            a, b = torch.randn(shp[0], shp[1], shp[2], device=dev), torch.randn(shp[0], shp[2], shp[3], device=dev)
            fn = lambda a=a, b=b: torch.bmm(a, b)
        else:
            a, b = torch.randn(shp[0], shp[1], device=dev), torch.randn(shp[1], shp[2], device=dev)
            fn = lambda a=a, b=b: torch.matmul(a, b)
        row = {"shape": key, "share_of_coarse_flops": None}
        for label, tf32 in (("fp32", old_tf32), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for _ in range(3):
                fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or (time.perf_counter() - t0 < 0.3 and reps < 200):
                fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
                reps += 1
            row[f"{label}_tflops"] = gemm_flops(key) * reps / (time.perf_counter() - t0) / 1e12
            if dev != "cuda":
                break
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        rows.append(row)
        del a, b
    total = sum(shape_flops.values())
    for r in rows:
        r["share_of_coarse_flops"] = shape_flops[r["shape"]] / total if total else None

    def weighted(label: str) -> float | None:
        timed = [r for r in rows if f"{label}_tflops" in r]
        f = sum(shape_flops[r["shape"]] for r in timed)
        t = sum(shape_flops[r["shape"]] / (r[f"{label}_tflops"] * 1e12) for r in timed)
        return (f / t / 1e12) if t > 0 else None

    return {
        "device": dev,
        "shapes": rows,
        "fp32_tflops_weighted": weighted("fp32"),
        "tf32_tflops_weighted": weighted("tf32"),
        "note": "rate cuBLAS reaches on the logged coarse shapes (flop-weighted over the timed shapes), random float32 "
        "inputs, same process",
    }


def relion5_figures(s: BenchSet, p: Paths) -> dict | None:
    """RELION-5 beside ours: the run bench/relion5/run.py measured on this machine (W/SET/relion5/relion5.json), else
    the README's figures from another day and GPU."""
    m = read_json(p.root / "relion5" / "relion5.json")
    if m:
        return dict(m, source=f"measured here: {m['relion']}, {m['ranks']} MPI ranks x {m['threads']} threads, "
                    f"{m['device']}, {m['date']}, `{m['command']}`")  # fmt: skip
    return dict(s.relion, source=RELION_NOTE) if s.relion else None


def call_startups(calls: list, its: list) -> list[float]:
    """Per harness call, its start to its first E-step batch (s): the run tells the seconds since its process started
    (the history's startup_s, in the call's first iteration); the harness process had lived process_age_at_call_s
    when it called the job (it imported torch and started CUDA before, and built the data)."""
    told = {r["iteration"]: r["startup_s"] for r in its if r.get("startup_s") is not None}
    out = []
    for c in calls:
        first, age = c["iterations"][0] + 1, c.get("process_age_at_call_s")
        if first in told and age is not None:
            out.append(round(told[first] - age, 2))
    return out


def build_report(s: BenchSet, p: Paths) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    done = iterations_done(p.run_root)
    state = load_state(p.run_root, done[-1]) if done else None
    history = list(state["history"]) if state else []
    calls = read_json(p.calls, [])
    build_info = read_json(p.data / "build.json", {})
    n = s.n
    its = []
    for h in history:
        c = (h.get("counters") or {}).get("coarse", {})
        row = {
            "iteration": h["iteration"],
            "healpix_order": h["healpix_order"],
            "search": "local" if h["local"] else "global",
            "window_shell": h["window_shell"],
            "coarse_shell": h["coarse_shell"],
            "wall_s": h["seconds"],
            "stages_s": {k: h["stages"].get(k, 0.0) for k in STAGES},
            "host_s": dict(h.get("host_s") or {}),
            # from the iteration's clock (the last one's end) to its last batch's results (read: the device is done)
            "estep_wall_s": (h.get("estep_s_per_rank") or [None])[0],
            "mean_rlnNrOfSignificantSamples": h["mean_significant"],
            "mean_max_prob": h["mean_max_prob"],
            "schedule_resolution_angst": h["resolution_angst"],
            "final": bool(h.get("final")),
            "startup_s": h.get("startup_s"),  # the process's start to its first E-step batch (its first iteration)
            "coarse_flops": c.get("flops"),
            "coarse_s": c.get("seconds"),
            "coarse_tflops": (c["flops"] / c["seconds"] / 1e12) if c.get("seconds") else None,
            "fine_flops": (h.get("counters") or {}).get("fine", {}).get("flops"),
            "store_flops": (h.get("counters") or {}).get("store", {}).get("flops"),
            "stage_bytes": {k: (h.get("counters") or {}).get(c, {}).get("bytes") for k, c in STAGE_BYTES.items()},
        }
        if s.job == "refine":
            g = gold_fsc(p, h["iteration"], dev)
            row["gold_fsc0143_angst"] = g["fsc0143_angst"] if g else None
        else:
            row["class_resolution_angst"] = h.get("class_resolution_angst")
            row["class_distribution"] = h.get("class_distribution")
        its.append(row)
    shape_flops = {}
    for h in history:
        for key, cnt in ((h.get("counters") or {}).get("coarse", {}).get("shapes") or {}).items():
            shape_flops[key] = shape_flops.get(key, 0.0) + cnt * gemm_flops(key)
    total_it = sum(r["wall_s"] for r in its)
    stage_tot = {k: sum(r["stages_s"][k] for r in its) for k in STAGES}
    stage_flops = {  # the E-step's counted matrix products, by the stage that runs them (RELION's names)
        "getAllSquaredDifferences": sum((r["coarse_flops"] or 0) + (r["fine_flops"] or 0) for r in its),
        "storeWeightedSums": sum(r["store_flops"] or 0 for r in its),
    }
    stage_bytes = {k: sum((r.get("stage_bytes") or {}).get(k) or 0 for r in its) for k in STAGE_BYTES}
    cflops = sum(r["coarse_flops"] or 0 for r in its)
    cs = sum(r["coarse_s"] or 0 for r in its)
    gpu_name = next((c["device"] for c in reversed(calls) if c.get("device")), device_name())
    peak = peak_for(gpu_name)
    coarse = {
        "flops": cflops,
        "seconds": cs,
        "tflops": (cflops / cs / 1e12) if cs else None,
        "card_peak": peak,
        "fraction_of_fp32_peak": (cflops / cs / 1e12 / peak["fp32_tflops"]) if (cs and peak) else None,
        "note": "FLOPs of the coarse-pass matrix products (cross term and |P|^2 term, 2·M·K·N each) over the time of "
        "the whole coarse pass on the device (CUDA events since d1cffa1, synchronised wall time before; projections "
        "and phase shifts included): a lower bound on the GEMM rate",
    }
    if shape_flops and (dev == "cuda" or s.name.startswith("tiny")):
        coarse["cublas_reference"] = cublas_reference(shape_flops)
    finished = is_finished(s, p)
    res = {
        "set": s.name,
        "title": s.title,
        "job": s.job,
        "date": time.strftime("%Y-%m-%d"),
        "device": gpu_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_cpus": os.cpu_count(),
        **git_commit(),
        "data": build_info,
        "flags": s.our_flags,
        "calls": calls,
        "finished": finished,
        "converged": bool(state and state["schedule"].get("converged")) if s.job == "refine" else None,
        "iterations": its,
        "n_iterations": len(its),
        "n_particles": n,
        "total": {
            "iterations_wall_s": total_it,
            "calls_wall_s": sum(c["wall_s"] for c in calls),
            "startup_s": call_startups(calls, its),
            "stages_s": stage_tot,
            "stage_flops": stage_flops,
            "stage_bytes": stage_bytes,
            "particle_iterations_per_s": (n * len(its) / total_it) if total_it else None,
        },
        "coarse": coarse,
        "memory": {
            "peak_gpu_allocated_bytes": max((c.get("peak_gpu_allocated_bytes", 0) for c in calls), default=0),
            "peak_gpu_reserved_bytes": max((c.get("peak_gpu_reserved_bytes", 0) for c in calls), default=0),
            "gpu_total_bytes": max((c.get("gpu_total_bytes", 0) for c in calls), default=0),
            "peak_host_rss_bytes": max((c.get("peak_rss_bytes", 0) for c in calls), default=0),
            "note": "per call: torch.cuda.max_memory_allocated/reserved, ru_maxrss of the harness process "
            "(the memory-mapped stack pages it touched count too)",
        },
        "relion5": relion5_figures(s, p),
    }
    if s.job == "refine":
        res["final_gold"] = (
            gold_fsc(p, None, dev) if finished else (gold_fsc(p, its[-1]["iteration"], dev) if its else None)
        )
    if its:
        res.update(truth_scores(s, p, history, dev))
    rel = res["relion5"] or {}
    if rel.get("wall_s") and rel.get("iterations"):
        rel_rate = n * rel["iterations"] / rel["wall_s"]
    elif rel.get("iteration_s"):
        rel_rate = n / rel["iteration_s"]
    else:
        rel_rate = None
    res["relion5_particle_iterations_per_s"] = rel_rate
    cpu = read_json(p.cpu_dir / "cpu.json")
    if cpu:
        if cpu.get("iteration_s") and its:
            g1 = history[0]
            gpu_pp = g1["seconds"] / n
            cpu_pp = cpu["iteration_s"] / cpu["n"]
            gpu_e = sum(g1["stages"].get(k, 0.0) for k in ESTEP_PER_PARTICLE) / n
            cpu_e = sum(cpu["stages"].get(k, 0.0) for k in ESTEP_PER_PARTICLE) / cpu["n"]
            cpu.update(
                gpu_iteration1_s_per_particle=gpu_pp,
                cpu_iteration1_s_per_particle=cpu_pp,
                cpu_over_gpu_iteration=cpu_pp / gpu_pp,
                cpu_over_gpu_estep=(cpu_e / gpu_e) if gpu_e else None,
                note="iteration 1 of both (same flags and sampling); 'estep' = getAllSquaredDifferences + convertAll "
                "+ storeWeightedSums per particle, without the per-iteration fixed costs (reference transforms, "
                "M-step) that a 200-particle run cannot amortise",
            )
        res["cpu_subset"] = cpu
    return res


def fmt(x, nd=1, unit=""):
    if x is None:
        return "—"
    if isinstance(x, float) and x == float("inf"):
        return "∞"
    return f"{x:.{nd}f}{unit}" if isinstance(x, (int, float)) else str(x)


def gib(b):
    return f"{b / 2**30:.2f} GiB" if b else "—"


def render_md(r: dict) -> str:
    s = SETS[r["set"]]
    main_dev = "GPU" if r["device"] != "cpu" else "main run (CPU)"
    L = [f"# {r['title']}: cryorefine on {r['device']}", ""]
    L += [
        f"- Date {r['date']}; commit {r['commit'][:12]}{' (uncommitted changes)' if r['dirty'] else ''}; "
        f"torch {r['torch']} (CUDA {r['cuda']}); {r['host_cpus']} host CPUs.",
        f"- Generated by `python bench/paper_bench.py run {r['set']}` "
        f"(bench/paper_bench.py; report: `paper_bench.py report {r['set']}`).",
    ]
    d = r.get("data") or {}
    if d:
        L.append(
            f"- Data: {d['n']:,} particles, box {d['box']}, {d['angpix']} Å/px, SNR {d['snr']} (model {d['model']}), "
            f"stack {d['stack_bytes'] / 2**20:,.1f} MiB; "
            f"built in {d['seconds']} s on the {d.get('projected_on')}:"
        )
        for k, v in d["steps"].items():
            L.append(f"  - {k} ({v['seconds']} s): `{v['cmd']}`")
    L.append("- Runs (one line per call; a later call continues with --continue):")
    for c in r["calls"]:
        mem = f", peak GPU {gib(c.get('peak_gpu_allocated_bytes'))}" if c.get("peak_gpu_allocated_bytes") else ""
        L.append(
            f"  - {c['started']}, {c['wall_s']} s, iterations {c['iterations'][0]}→{c['iterations'][1]}{mem}: "
            f"`{' '.join(c['argv'])}`"
        )
    status = (
        "finished" + (" (converged)" if r.get("converged") else "")
        if r["finished"]
        else "NOT finished (continue with another `run` call)"
    )
    L += ["", f"Status: **{status}** after {r['n_iterations']} iterations.", ""]
    rel = r.get("relion5") or {}
    tot = r["total"]
    ft = r.get("fsc_to_truth") or {}
    measured = rel.get("source", "").startswith("measured")
    L += [f"| | cryorefine | RELION-5 ({'measured here' if measured else 'H100, README'}) |", "|---|---|---|"]
    if r["job"] == "refine":
        L.append(
            f"| wall time | {fmt(tot['calls_wall_s'])} s (iterations {fmt(tot['iterations_wall_s'])} s) | "
            + (f"{rel['wall_s']} s, {rel.get('status', '')}" if rel.get("wall_s") else rel.get("status", "—"))
            + " |"
        )
        L.append(f"| iterations | {r['n_iterations']} | {rel.get('iterations', '—')} |")
        g = r.get("final_gold") or {}
        L.append(
            f"| gold-standard resolution (FSC 0.143, unfiltered halves) | {fmt(g.get('fsc0143_angst'), 2, ' Å')} | "
            f"{fmt(rel.get('resolution_angst'), 2, ' Å')} |"
        )
        L.append(f"| FSC to truth 0.5 ({ft.get('map', '')}) | {fmt(ft.get('fsc05_angst'), 2, ' Å')} | — |")
        if rel.get("late_iteration_s"):
            last = r["iterations"][-1]["wall_s"] if r["iterations"] else None
            L.append(f"| last iteration | {fmt(last)} s | late iterations {rel['late_iteration_s']} s |")
    else:
        per = [x["wall_s"] for x in r["iterations"]]
        L.append(
            f"| wall time per iteration (mean; first / last) | {fmt(sum(per) / len(per) if per else None)} s "
            f"({fmt(per[0] if per else None)} / {fmt(per[-1] if per else None)}) | {rel.get('iteration_s', '—')} s |"
        )
        L.append(f"| iterations | {r['n_iterations']} of {s.max_iter} | {rel.get('iterations', '—')} |")
        L.append(
            f"| FSC to truth 0.5, best class / largest class | {fmt(ft.get('best_fsc05_angst'), 2, ' Å')} / "
            f"{fmt(ft.get('largest_class_fsc05_angst'), 2, ' Å')} | — |"
        )
    if tot.get("startup_s"):
        told = ", ".join(f"{x:.1f}" for x in tot["startup_s"])
        L.append(f"| start-up (the call's start to its first E-step batch; per call) | {told} s | — |")
    L.append(
        f"| particle-iterations/s | {fmt(tot['particle_iterations_per_s'])} | "
        f"{fmt(r.get('relion5_particle_iterations_per_s'))} |"
    )
    busy = [(c["wall_s"], c["gpu_busy_percent"]) for c in r["calls"] if c.get("gpu_busy_percent") is not None]
    if busy:  # weighted by each call's wall time
        mean = sum(w * b for w, b in busy) / sum(w for w, _ in busy)
        L.append(f"| GPU busy (NVML utilisation, 0.1 s samples over the run's calls) | {mean:.1f} % | — |")
    pe = r.get("pose_errors")
    if pe:
        L.append(
            f"| pose error vs truth, median (p90) | {pe['angle_median_deg']}° ({pe['angle_p90_deg']}°), "
            f"{pe['shift_median_angst']} Å ({pe['shift_p90_angst']} Å) | — |"
        )
    L += ["", "## Per iteration", ""]
    if r["job"] == "refine":
        L += [
            "gold 0.143: FSC of the unfiltered half maps in the final iteration; in the others, the FSC in the "
            "iteration's model.star (the half sets' Fourier-space averages, as RELION's compareTwoHalves), as no "
            "unfiltered maps are written.",
            "",
        ]
    lab = [STAGE_LABEL.get(k, k) for k in STAGES]
    res_col = "gold 0.143 (Å)" if r["job"] == "refine" else "class res. (Å, best)"
    L.append(
        "| it | sampling | window (coarse) | wall s | "
        + " | ".join(lab)
        + f" | coarse TFLOP/s | mean nsig | sched. res. (Å) | {res_col} |"
    )
    L.append("|" + "---|" * (8 + len(STAGES)))
    for x in r["iterations"]:
        rc = (
            fmt(x.get("gold_fsc0143_angst"), 2)
            if r["job"] == "refine"
            else fmt(min(x["class_resolution_angst"]) if x.get("class_resolution_angst") else None, 2)
        )
        L.append(
            f"| {x['iteration']}{' (final)' if x['final'] else ''} | hp{x['healpix_order']} {x['search']} | "
            f"{x['window_shell']} ({x['coarse_shell']}) | {fmt(x['wall_s'])} | "
            + " | ".join(fmt(x["stages_s"][k]) for k in STAGES)
            + f" | {fmt(x['coarse_tflops'], 2)} | {fmt(x['mean_rlnNrOfSignificantSamples'])} | "
            f"{fmt(x['schedule_resolution_angst'], 2)} | {rc} |"
        )
    st = tot["stages_s"]
    ssum = sum(st.values()) or 1.0
    c = r["coarse"]
    pk = c.get("card_peak") or {}
    head = "| stage | s | share | counted TFLOP | TFLOP/s | of FP32 peak | counted GB | GB/s | of HBM peak |"
    L += ["", "## Where the time goes (all iterations)", "", head, "|---|---|---|---|---|---|---|---|---|"]
    for k in STAGES:
        flops = (tot.get("stage_flops") or {}).get(k)
        rate = flops / st[k] / 1e12 if flops and st[k] > 0 else None
        peak = f"{100 * rate / pk['fp32_tflops']:.1f} %" if rate and pk else "—"
        counted = f"{flops / 1e12:.2f} | {fmt(rate, 2)} | {peak}" if flops else "— | — | —"
        nbytes = (tot.get("stage_bytes") or {}).get(k)
        gbps = nbytes / st[k] / 1e9 if nbytes and st[k] > 0 else None
        of_hbm = f"{100 * gbps / 1e3 / pk['hbm_tbps']:.1f} %" if gbps and pk.get("hbm_tbps") else "—"
        moved = f"{nbytes / 1e9:.1f} | {fmt(gbps, 1)} | {of_hbm}" if nbytes else "— | — | —"
        L.append(f"| {STAGE_LABEL.get(k, k)} | {fmt(st[k])} | {100 * st[k] / ssum:.0f} % | {counted} | {moved} |")
    host = {}
    for x in r["iterations"]:
        for k, v in (x.get("host_s") or {}).items():
            host[k] = host.get(k, 0.0) + v
    for k, v in host.items():  # host-only steps between the stages (the GPU has nothing queued): timing.host
        L.append(f"| {k} (host only) | {fmt(v)} | | | | | | | |")
    # the E-step's wall time not in its stages' device spans: the device idle between and around its stages
    gaps = [
        x["estep_wall_s"] - sum((x.get("host_s") or {}).values()) - sum(x["stages_s"][k] for k in STAGES[:-1])
        for x in r["iterations"]
        if x.get("estep_wall_s") is not None and x.get("host_s")
    ]
    if gaps:
        L.append(f"| E-step outside its stages (on a GPU: the device idle) | {fmt(sum(gaps))} | | | | | | | |")
    rest = tot["iterations_wall_s"] - ssum - sum(host.values()) - sum(gaps)
    L.append(f"| other ({'the rest: ' if host else ''}writing files, bookkeeping) | {fmt(rest)} | | | | | | | |")
    L.append(
        "\nCounted: the matrix products of the coarse and fine passes (getAllSquaredDifferences) and of the weighted "
        "sums (storeWeightedSums), 2·M·N·K each, over the stage's whole time (interpolation, masking and sorting "
        "included): a lower bound on the products' rate. Counted bytes: the device memory a memory-bound stage must "
        "touch at least once (getFourierTransformsAndCTFs: the images read and the transforms, CTFs and 1/σ² written; "
        "convertAllSquaredDifferencesToWeights: the coarse scores read, the fine scores read and their weights "
        "written), over the stage's time: a lower bound on its bandwidth."
    )
    L += [
        "",
        "## Coarse pass (getAllSquaredDifferences, pass 0)",
        "",
        f"- {c['flops'] / 1e12:.2f} TFLOP in {fmt(c['seconds'], 2)} s: **{fmt(c['tflops'], 2)} TFLOP/s**"
        + (
            f", {100 * c['fraction_of_fp32_peak']:.1f} % of the {pk['card']}'s FP32 peak {pk['fp32_tflops']} TFLOP/s "
            f"(TF32 tensor cores: {pk['tf32_tflops']})"
            if c.get("fraction_of_fp32_peak")
            else ""
        )
        + ". "
        + c["note"]
        + ".",
    ]
    cb = c.get("cublas_reference")
    if cb:
        precision = ", ".join(sorted({call.get("precision", "fp32") for call in r["calls"]}))  # older calls: fp32
        L.append(
            f"- cuBLAS on the same shapes ({cb['device']}, same process; the run's coarse products: {precision}): "
            f"flop-weighted {fmt(cb['fp32_tflops_weighted'], 2)} TFLOP/s fp32"
            + (f", {fmt(cb['tf32_tflops_weighted'], 2)} TFLOP/s TF32" if cb.get("tf32_tflops_weighted") else "")
        )
        for x in cb["shapes"]:
            if "fp32_tflops" in x:
                L.append(
                    f"  - `{x['shape']}` ({100 * (x['share_of_coarse_flops'] or 0):.0f} % of the coarse FLOPs): "
                    f"{fmt(x['fp32_tflops'], 2)} TFLOP/s fp32"
                    + (f", {fmt(x.get('tf32_tflops'), 2)} TFLOP/s TF32" if x.get("tf32_tflops") else "")
                )
            else:
                L.append(f"  - `{x['shape']}`: {x.get('skipped')}")
    m = r["memory"]
    L += [
        "",
        "## Memory",
        "",
        f"- Peak GPU memory {gib(m['peak_gpu_allocated_bytes'])} allocated, "
        f"{gib(m['peak_gpu_reserved_bytes'])} reserved (of {gib(m['gpu_total_bytes'])}); "
        f"host peak RSS {gib(m['peak_host_rss_bytes'])} ({m['note']}).",
    ]
    cpu = r.get("cpu_subset")
    L += ["", "## CPU path", ""]
    if not cpu:
        L.append(f"- Not run (`python bench/paper_bench.py cpu {r['set']}`).")
    else:
        L.append(
            f"- {cpu['n']} particles, one iteration, {cpu['threads']} threads, no CUDA: {cpu['status']}, "
            f"{cpu['wall_s']} s wall; `{' '.join(cpu['argv'])}`."
        )
        if cpu.get("cpu_over_gpu_iteration"):
            L.append(
                f"- Iteration 1 per particle: CPU {1e3 * cpu['cpu_iteration1_s_per_particle']:.2f} ms, "
                f"{main_dev} {1e3 * cpu['gpu_iteration1_s_per_particle']:.3f} ms: "
                f"**{main_dev} {cpu['cpu_over_gpu_iteration']:.1f}× faster** "
                f"(E-step stages per particle: {fmt(cpu.get('cpu_over_gpu_estep'))}×). {cpu['note']}."
            )
    L += ["", f"RELION-5 figures: {rel.get('source', RELION_NOTE)}.", ""]
    return "\n".join(L)


def report(s: BenchSet, p: Paths, out: Path) -> Path:
    r = build_report(s, p)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"{r['date']}-{device_slug(r['device'])}-{s.name}"
    write_json(f"{prefix}.json", r)
    Path(f"{prefix}.md").write_text(render_md(r))
    with tarfile.open(f"{prefix}-run.tgz", "w:gz") as tar:
        extra = [p.run_dir / "run.log", p.calls, p.data / "build.json", p.cpu_dir / "cpu.json", p.cpu_dir / "run.log"]
        last = iterations_done(p.run_root)
        if last:
            pre = f"{p.run_root}_it{last[-1]:03d}"
            extra += [Path(f) for f in glob.glob(f"{pre}_*model.star") + [f"{pre}_data.star", f"{pre}_optimiser.star"]]
        extra += [Path(f"{p.run_root}_model.star"), Path(f"{p.run_root}_data.star")]
        for f in extra:
            if Path(f).exists() and Path(f).stat().st_size < 64 * 2**20:
                tar.add(f, arcname=f"{s.name}/{Path(f).relative_to(p.root)}")
    log(f"{s.name}: wrote {prefix}.md, .json, -run.tgz")
    return Path(f"{prefix}.json")


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("action", choices=["build", "run", "cpu", "report"])
    ap.add_argument("set", choices=sorted(SETS))
    ap.add_argument(
        "--workdir",
        default=os.environ.get("BENCH_WORKDIR", "/tmp/cryobench"),
        help="data and runs (the machine's disk)",
    )
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(HERE / "results"),
        help="where the result files go (default $OUT, else bench/results)",
    )
    ap.add_argument("--budget", type=float, default=480.0, help="seconds this call may take, build and report included")
    ap.add_argument("--reserve", type=float, default=45.0, help="seconds kept for the report (FSCs, cuBLAS reference)")
    ap.add_argument(
        "--cpu_n", type=int, default=None, help="particles of the CPU-path iteration (0: skip; default per set)"
    )
    ap.add_argument("--no_gpu", action="store_true", help="run on the CPU even if CUDA is there (tests)")
    ap.add_argument(
        "--extra",
        default="",
        help="more flags for our refine/classify, e.g. '--batch 256' after a GPU out-of-memory stop",
    )
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    s = SETS[a.set]
    p = Paths(a.workdir, s)
    gpu = cuda_available() and not a.no_gpu
    cpu_n = s.cpu_n if a.cpu_n is None else a.cpu_n

    def left():
        return a.budget - (time.perf_counter() - t_start) - a.reserve

    if a.action in ("build", "run", "cpu"):
        build(s, p, gpu)
    if a.action == "run" and not is_finished(s, p):
        if left() < 20:
            log(
                f"{s.name}: no time left for the run in this call ({left():.0f} s: --budget {a.budget:.0f} s less "
                f"{time.perf_counter() - t_start:.0f} s so far and --reserve {a.reserve:.0f} s for the report); give a "
                "larger --budget or a smaller --reserve"
            )
        else:
            run_gpu(s, p, gpu, max(1.0, left()), a.extra)
    if (
        a.action in ("run", "cpu")
        and cpu_n > 0
        and (a.action == "cpu" or (is_finished(s, p) and not (p.cpu_dir / "cpu.json").exists()))
    ):
        if left() > 20:
            run_cpu(s, p, cpu_n, left())
        else:
            log(f"{s.name}: CPU subset skipped, {left():.0f} s left (run `paper_bench.py cpu {s.name}` later)")
    if a.action in ("run", "cpu", "report"):
        if iterations_done(p.run_root) or (p.cpu_dir / "cpu.json").exists():
            report(s, p, Path(a.out))
        else:
            log(f"{s.name}: nothing to report yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
