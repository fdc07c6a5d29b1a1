#!/usr/bin/env python3
"""Scaling of our auto-refine over 1, 2, 4, 8 GPUs of one host (issue 7): torchrun, NCCL, one process per GPU.

usage:
  python bench/scaling.py SET [--gpus "1 2 4 8"] [--workdir W] [--out DIR] [--budget S] [--max_seconds S]
                              [--no_gpu] [--extra FLAGS]

SET: a refine set of bench/paper_bench.py (betagal, trpv1 = the 5,000-particle TRPV1 subset, tiny for tests).
The data are built once (paper_bench.build, cached in W/SET/data); then, for each N of --gpus (default: 1, 2, 4, 8
up to the GPUs there are), a fresh run in W/SET/scaling/nN:

  python -m torch.distributed.run --standalone --nproc_per_node N -m cryorefine.cli.main refine ... \\
      --gpu --max_seconds T

with RELION's benchmark flags (paper_bench.job_argv). Each rank takes GPU LOCAL_RANK; --batch is automatic (1024
with one rank, about 8 batches per rank per iteration with more: auto_refine.auto_batch_size). OMP_NUM_THREADS =
host CPUs / N for every N (torchrun would set 1 for N > 1 only). T (--max_seconds, default $SCALING_MAX_SECONDS or
200) is capped so that all runs fit --budget (the seconds of this call, default $SCALING_BUDGET or 540); a run that
stops early is compared with N=1 on the iterations both finished. A run that fails is recorded with its error tail;
the next N runs.

Results (rewritten after every run, so a killed call leaves what it had): OUT/<date>-<device>-scaling-<SET>.md and
.json, OUT/<date>-<device>-scaling-<SET>-logs.tgz (each run's torchrun output and run.log). Per N: wall time
(process and iterations), seconds per iteration, iterations, gold-standard resolution (FSC 0.143 of the unfiltered
half maps), speed-up and parallel efficiency T1 / (N · TN) against N=1 of this call, the "combine ranks" stage per
iteration (rank 0's all-reduce of the accumulators and poses, including its wait for the slowest rank), batches per
rank per iteration. --no_gpu runs CPU ranks with gloo (tests). The commit is $COMMIT when set (the device copy's git
HEAD can be stale).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import paper_bench as pb  # noqa: E402  (puts the repository's src on sys.path)

COMBINE = "combine ranks"
RUN_OVERHEAD_S = (
    45.0  # per run, beyond --max_seconds: torchrun and CUDA start-up, loading, an iteration running past the estimate
)
REPORT_RESERVE_S = 20.0
MIN_RUN_S = 30.0


def log(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def commit_info() -> dict:
    env = os.environ.get("COMMIT", "").strip()
    g = pb.git_commit()
    if env:
        return {"commit": env, "commit_source": "env COMMIT", "git_head_of_this_copy": g["commit"], "dirty": g["dirty"]}
    return {"commit": g["commit"], "commit_source": "git HEAD of this copy", "dirty": g["dirty"]}


def host_info(gpu: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "host_cpus": os.cpu_count()}
    if gpu:
        info["device"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        try:
            r = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
            info["topology"] = r.stdout.strip()[:3000]
        except (OSError, subprocess.SubprocessError):
            info["topology"] = None
    else:
        info["device"] = "cpu"
        info["gpus"] = 0
    return info


def run_paths(p: pb.Paths, n: int) -> pb.Paths:
    """paper_bench's paths with the run in W/SET/scaling/nN (the data stay shared)."""
    q = pb.Paths(p.root.parent, pb.SETS[p.root.name])
    q.run_dir = p.root / "scaling" / f"n{n}"
    q.run_root = q.run_dir / "run"
    q.fsc_cache = q.run_dir / "fsc_cache.json"
    q.calls = q.run_dir / "calls.json"
    return q


class Runner:
    """One torchrun job in its own session, so that a timeout (or our own SIGTERM) stops every rank."""

    current: subprocess.Popen | None = None

    @classmethod
    def stop(cls, grace: float = 10.0) -> None:
        proc = cls.current
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    @classmethod
    def run(cls, cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, float, bool]:
        t0 = time.perf_counter()
        with open(log_path, "w") as fh:
            cls.current = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                rc = cls.current.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                cls.stop()
                rc = cls.current.returncode if cls.current.returncode is not None else -9
        cls.current = None
        return rc, time.perf_counter() - t0, timed_out


def log_tail(path: Path, n: int = 25) -> str:
    """The ranks' own error lines (before torchrun's traceback buries them), then the last n lines."""
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if not re.search(r"particles, .*/s, ", x)]
    except OSError:
        return ""
    key = [
        x
        for x in lines[:-n]
        if re.search(r"error|Error|out of memory|NCCL|CUDA", x)
        and "torch/distributed/elastic" not in x
        and 'File "' not in x
    ]
    return "\n".join(key[:12] + (["..."] if key else []) + lines[-n:])


def run_summary(path: Path) -> dict | None:
    """Rank 0's last JSON line on stdout: {"final_resolution_angst", "iterations", "seconds"} or
    {"stopped": true, ...}."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"iterations"' in line:
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def one_run(s: pb.BenchSet, p: pb.Paths, n: int, gpu: bool, limit: float, hard: float, extra: str) -> dict:
    """N ranks from a fresh output dir, --max_seconds limit, killed after hard seconds; what the run left on disk."""
    q = run_paths(p, n)
    if q.run_dir.exists():
        shutil.rmtree(q.run_dir)
    q.run_dir.mkdir(parents=True)
    argv = pb.job_argv(s, q, gpu, limit, extra=extra)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        "-m",
        "cryorefine.cli.main",
        *argv,
    ]
    threads = max(1, (os.cpu_count() or 1) // n)
    env = pb.child_env(OMP_NUM_THREADS=str(threads))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    out_log = q.run_dir / "torchrun.log"
    log(f"N={n}: {' '.join(cmd[1:8])} {' '.join(argv)} (OMP_NUM_THREADS={threads}, hard timeout {hard:.0f} s)")
    pruner = pb.Pruner(q.run_root, class_maps=False)
    pruner.start()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        rc, wall, timed_out = Runner.run(cmd, env, out_log, hard)
    finally:
        pruner.stop.set()
        pruner.join()
        pruner.prune()
    r = {
        "n": n,
        "started": started,
        "argv": ["torchrun", "--standalone", "--nproc_per_node", str(n), "-m", "cryorefine.cli.main", *argv],
        "omp_num_threads": threads,
        "max_seconds": round(limit),
        "hard_timeout_s": round(hard),
        "rc": rc,
        "timed_out": timed_out,
        "process_wall_s": round(wall, 2),
        "summary": run_summary(out_log),
    }
    runlog = q.run_dir / "run.log"
    text = runlog.read_text(errors="replace") if runlog.exists() else ""
    m = re.search(r"(\d+) ranks \((\w+)\)", text)
    r["world_size"], r["backend"] = (int(m.group(1)), m.group(2)) if m else (None, None)
    m = re.search(r"batches of (\d+)", text)
    r["batch_size"] = int(m.group(1)) if m else None
    done = pb.iterations_done(q.run_root)
    state = pb.load_state(q.run_root, done[-1]) if done else None
    hist = list(state["history"]) if state else []
    r["finished"] = Path(f"{q.run_root}_class001.mrc").exists()
    r["converged"] = bool(state and state["schedule"].get("converged"))
    r["stopped_early"] = not r["finished"]
    r["iterations"] = [
        {
            "iteration": h["iteration"],
            "seconds": h["seconds"],
            "combine_s": h["stages"].get(COMBINE, 0.0),
            "batches_per_rank": list(h.get("batches_per_rank") or []),
            "estep_s_per_rank": list(h.get("estep_s_per_rank") or []),
            "healpix_order": h["healpix_order"],
            "local": bool(h["local"]),
            "resolution_angst": h["resolution_angst"],
            "final": bool(h.get("final")),
            "stages_s": {k: round(v, 3) for k, v in h["stages"].items()},
        }
        for h in hist
    ]
    r["n_iterations"] = len(hist)
    r["iterations_wall_s"] = sum(x["seconds"] for x in r["iterations"])
    r["combine_s"] = sum(x["combine_s"] for x in r["iterations"])
    if done:
        g = pb.gold_fsc(q, None if r["finished"] else done[-1], "cpu")
        r["gold"] = (
            dict(
                g,
                of="final half maps (run_half?_class001_unfil.mrc)"
                if r["finished"]
                else f"iteration {done[-1]} half maps (not finished)",
            )
            if g
            else None
        )
    else:
        r["gold"] = None
    if rc != 0 or not done:
        r["error_tail"] = log_tail(out_log)
    status = (
        "finished" + (" (converged)" if r["converged"] else "")
        if r["finished"]
        else ("timed out" if timed_out else "stopped by --max_seconds" if rc == 0 else f"failed (rc {rc})")
    )
    r["status"] = status
    log(
        f"N={n}: {status}, {r['n_iterations']} iterations, {wall:.1f} s"
        + (f"; error tail:\n{r['error_tail'][-1500:]}" if r.get("error_tail") else "")
    )
    return r


def base_run(rep: dict) -> dict | None:
    return next((r for r in rep["runs"] if r["n"] == 1), None)


def compare(base: dict | None, r: dict) -> dict:
    """Speed-up and efficiency of r against N=1 (base) on the iterations both ran; on the totals when both finished."""
    if not base or not base["iterations"] or not r["iterations"]:
        return {}
    n = r["n"]
    t1 = {x["iteration"]: x for x in base["iterations"]}
    tn = {x["iteration"]: x for x in r["iterations"]}
    common = sorted(set(t1) & set(tn))
    out = {"common_iterations": [common[0], common[-1]] if common else None, "n_common": len(common)}

    def ratio(its):
        a, b = sum(t1[i]["seconds"] for i in its), sum(tn[i]["seconds"] for i in its)
        return (a / b if b > 0 else None), a, b

    sp, a, b = ratio(common)
    out.update(
        t1_common_s=a,
        tn_common_s=b,
        speedup_iterations=sp,
        efficiency_iterations=sp / n if sp else None,
        s_per_iteration=b / len(common) if common else None,
        t1_s_per_iteration=a / len(common) if common else None,
    )
    later = [i for i in common if i > 1]
    if later:
        sp2, _, _ = ratio(later)
        out.update(speedup_after_first=sp2, efficiency_after_first=sp2 / n if sp2 else None)
    out["same_schedule"] = all(
        (t1[i]["healpix_order"], t1[i]["local"], t1[i]["final"])
        == (tn[i]["healpix_order"], tn[i]["local"], tn[i]["final"])
        for i in common
    )
    if base["finished"] and r["finished"]:
        sp_tot = base["iterations_wall_s"] / r["iterations_wall_s"] if r["iterations_wall_s"] else None
        sp_wall = base["process_wall_s"] / r["process_wall_s"] if r["process_wall_s"] else None
        out.update(
            speedup_total=sp_tot,
            efficiency_total=sp_tot / n if sp_tot else None,
            speedup_process_wall=sp_wall,
            efficiency_process_wall=sp_wall / n if sp_wall else None,
            same_iteration_count=base["n_iterations"] == r["n_iterations"],
        )
    return out


def fmt(x, nd=1, unit=""):
    return pb.fmt(x, nd, unit)


def render_md(rep: dict) -> str:
    s = pb.SETS[rep["set"]]
    h = rep["host"]
    L = [f"# Scaling of auto-refine over GPUs of one host: {s.title}", ""]
    L.append(f"- Device: {h['device']} × {h['gpus']} GPUs" if h["gpus"] else "- Device: CPU ranks (gloo; --no_gpu)")
    L.append(
        f"- Date {rep['date']}; commit {rep['commit'][:12]} "
        f"({rep['commit_source']}{', uncommitted changes in this copy' if rep.get('dirty') else ''}); "
        f"torch {h['torch']} (CUDA {h['cuda']}); {h['host_cpus']} host CPUs."
    )
    L.append(
        f"- Command: `{rep['command']}`; GPU counts asked {rep['asked']}, run {[r['n'] for r in rep['runs']]}"
        + (f"; skipped: {'; '.join(rep['skipped'])}" if rep["skipped"] else "")
        + "."
    )
    d = rep.get("data") or {}
    if d:
        L.append(
            f"- Data: {d.get('n', s.n):,} particles, box {d.get('box')}, {d.get('angpix')} Å/px "
            f"(paper_bench build, {d.get('seconds')} s; this call: {rep['build_s']:.1f} s)."
        )
    L.append(
        "- Each run: `torchrun --standalone --nproc_per_node N -m cryorefine.cli.main refine ..."
        f"{' --gpu' if h['gpus'] else ''} --max_seconds T` "
        "(RELION's benchmark flags of bench/paper_bench.py), fresh output dir; OMP_NUM_THREADS = host CPUs / N; "
        "automatic --batch (1024 for one rank, about 8 batches per rank per iteration for more). "
        f"Budget of the call {rep['budget_s']:.0f} s, T ≤ {rep['max_seconds']:.0f} s."
    )
    L += [
        "",
        "## Summary",
        "",
        "| N | backend | batch | status | iterations | process wall s | iterations s | s / iteration (common its) "
        "| speed-up | efficiency T1/(N·TN) | speed-up, its ≥ 2 | total speed-up (both finished) "
        "| combine ranks s / it | gold 0.143 (Å) |",
        "|" + "---|" * 14,
    ]
    for r in rep["runs"]:
        c = r.get("vs_n1") or {}
        comb = r["combine_s"] / r["n_iterations"] if r["n_iterations"] else None
        tot = (
            f"{fmt(c.get('speedup_total'), 2)}× (eff. {fmt(c.get('efficiency_total'), 2)})"
            if c.get("speedup_total")
            else "—"
        )
        L.append(
            f"| {r['n']} | {r.get('backend') or '—'} | {r.get('batch_size') or '—'} | {r['status']} | "
            f"{r['n_iterations']} | {fmt(r['process_wall_s'])} | "
            f"{fmt(r['iterations_wall_s'])} | {fmt(c.get('s_per_iteration') if c else None, 2)} | "
            f"{fmt(c.get('speedup_iterations'), 2)} | "
            f"{fmt(c.get('efficiency_iterations'), 2)} | {fmt(c.get('speedup_after_first'), 2)} | {tot} | "
            f"{fmt(comb, 3)} | "
            f"{fmt((r.get('gold') or {}).get('fsc0143_angst'), 2)} |"
        )
    L.append("")
    notes = []
    for r in rep["runs"]:
        c = r.get("vs_n1") or {}
        if r["n"] != 1 and c.get("common_iterations"):
            a, b = c["common_iterations"]
            part = f"N={r['n']}: compared with N=1 over iterations {a}–{b}"
            if r["stopped_early"] or (base_run(rep) or {}).get("stopped_early"):
                part += " (one of the two runs stopped early: per-iteration times over the iterations both finished)"
            if not c.get("same_schedule"):
                part += "; the sampling schedules differ within those iterations"
            if c.get("same_iteration_count") is False:
                part += "; the runs took different numbers of iterations, so the total speed-up mixes in different work"
            notes.append(part + ".")
        if r.get("error_tail"):
            notes.append(f"N={r['n']} {r['status']}; error tail:\n\n```\n{r['error_tail'][-2500:]}\n```")
    if notes:
        L += [f"- {x}" for x in notes] + [""]
    L += [
        "Speed-up = T1 / TN on the same iterations (iteration wall times of rank 0's history); "
        "efficiency = speed-up / N. 'its ≥ 2' leaves out iteration 1 (CUDA/cuBLAS warm-up). "
        "Process wall includes torchrun start-up, loading and the final files. 'combine ranks' is rank 0's "
        "all-reduce of the accumulators and poses, and includes rank 0's wait for the slowest rank. "
        "'E-step s per rank': each rank's seconds from its iteration's start to the end of its last batch "
        "(after a device synchronisation).",
        "",
    ]
    L += ["## Per iteration", ""]
    runs = [r for r in rep["runs"] if r["iterations"]]
    its = sorted({x["iteration"] for r in runs for x in r["iterations"]})
    L.append(
        "| it | "
        + " | ".join(f"N={r['n']}: s (combine s) [batches per rank] {{E-step s per rank}}" for r in runs)
        + " | sampling (N=1 or first) |"
    )
    L.append("|" + "---|" * (len(runs) + 2))
    for i in its:
        cells, samp = [], ""
        for r in runs:
            x = next((y for y in r["iterations"] if y["iteration"] == i), None)
            if x is None:
                cells.append("—")
                continue
            per_rank_s = (
                "{" + ", ".join(f"{v:.2f}" for v in x.get("estep_s_per_rank") or []) + "}"
                if x.get("estep_s_per_rank")
                else ""
            )
            cells.append(
                f"{fmt(x['seconds'], 2)} ({fmt(x['combine_s'], 3)}) {x['batches_per_rank']} {per_rank_s}".rstrip()
            )
            samp = (
                samp or f"hp{x['healpix_order']} {'local' if x['local'] else 'global'}{' final' if x['final'] else ''}"
            )
        L.append(f"| {i} | " + " | ".join(cells) + f" | {samp} |")
    L += ["", "## Runs", ""]
    for r in rep["runs"]:
        L.append(
            f"- N={r['n']} ({r['started']}, rc {r['rc']}, {r['status']}, OMP_NUM_THREADS={r['omp_num_threads']}): "
            f"`{' '.join(r['argv'])}`"
        )
    if h.get("topology"):
        L += ["", "## GPU topology (nvidia-smi topo -m)", "", "```", h["topology"], "```"]
    L.append("")
    return "\n".join(L)


def write_report(rep: dict, runs_root: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = pb.device_slug(rep["host"]["device"])
    prefix = out / f"{rep['date']}-{slug}-scaling-{rep['set']}"
    pb.write_json(f"{prefix}.json", rep)
    Path(f"{prefix}.md").write_text(render_md(rep))
    with tarfile.open(f"{prefix}-logs.tgz", "w:gz") as tar:
        for r in rep["runs"]:
            d = runs_root / f"n{r['n']}"
            for name in ("torchrun.log", "run.log", "run_model.star"):
                f = d / name
                if f.exists() and f.stat().st_size < 16 * 2**20:
                    tar.add(f, arcname=f"scaling-{rep['set']}/n{r['n']}/{name}")
    return Path(f"{prefix}.json")


def print_summary(rep: dict) -> None:
    h = rep["host"]
    where = f"{h['device']} x{h['gpus']}" if h["gpus"] else "CPU ranks (gloo)"
    print(f"scaling {rep['set']} on {where} (commit {rep['commit'][:12]}, {rep['wall_s']:.0f} s):")
    print(
        f"{'N':>3} {'status':<28} {'its':>4} {'wall s':>8} {'its s':>8} {'s/it':>7} {'speedup':>8} {'eff':>6} "
        f"{'tot.sp':>7} {'comb s/it':>9} {'gold Å':>7}  batches/rank (last it)"
    )
    for r in rep["runs"]:
        c = r.get("vs_n1") or {}
        comb = r["combine_s"] / r["n_iterations"] if r["n_iterations"] else None
        last = r["iterations"][-1]["batches_per_rank"] if r["iterations"] else None
        print(
            f"{r['n']:>3} {r['status'][:28]:<28} {r['n_iterations']:>4} {fmt(r['process_wall_s']):>8} "
            f"{fmt(r['iterations_wall_s']):>8} "
            f"{fmt(c.get('s_per_iteration'), 2):>7} {fmt(c.get('speedup_iterations'), 2):>8} "
            f"{fmt(c.get('efficiency_iterations'), 2):>6} "
            f"{fmt(c.get('speedup_total'), 2):>7} {fmt(comb, 3):>9} "
            f"{fmt((r.get('gold') or {}).get('fsc0143_angst'), 2):>7}  {last}"
        )
    for x in rep["skipped"]:
        print(f"skipped: {x}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("set", choices=sorted(k for k, v in pb.SETS.items() if v.job == "refine"))
    ap.add_argument(
        "--gpus", default="", help='GPU counts (ranks), e.g. "1 2" (default: 1 2 4 8 up to the GPUs there are)'
    )
    ap.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR", "/tmp/cryobench"))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument(
        "--budget", type=float, default=float(os.environ.get("SCALING_BUDGET", 540)), help="seconds this call may take"
    )
    ap.add_argument(
        "--max_seconds",
        type=float,
        default=float(os.environ.get("SCALING_MAX_SECONDS", 200)),
        help="--max_seconds of each run (at most)",
    )
    ap.add_argument("--no_gpu", action="store_true", help="CPU ranks with gloo (tests)")
    ap.add_argument("--extra", default="", help="more flags for every run")
    ap.add_argument(
        "--command", default=os.environ.get("SCALING_COMMAND"), help="the command line to record (default: this one)"
    )
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    s = pb.SETS[a.set]
    p = pb.Paths(a.workdir, s)
    gpu = pb.cuda_available() and not a.no_gpu
    host = host_info(gpu)
    have = host["gpus"] if gpu else (os.cpu_count() or 1)
    asked = [int(x) for x in a.gpus.replace(",", " ").split()] or [n for n in (1, 2, 4, 8) if n <= have]
    if 1 not in asked:
        asked = [1] + asked  # the reference
    asked = sorted(set(asked))
    ns = [n for n in asked if n <= have]
    skipped = [f"N={n}: only {have} {'GPUs' if gpu else 'CPUs'}" for n in asked if n > have]

    t0 = time.perf_counter()
    build_info = pb.build(s, p, gpu)
    build_s = time.perf_counter() - t0
    rep = {
        "set": a.set,
        "title": s.title,
        "date": time.strftime("%Y-%m-%d"),
        "host": host,
        **commit_info(),
        "command": a.command or " ".join(["python3", "bench/scaling.py", *(sys.argv[1:] if argv is None else argv)]),
        "asked": asked,
        "skipped": skipped,
        "budget_s": a.budget,
        "max_seconds": a.max_seconds,
        "flags": s.our_flags,
        "data": build_info,
        "build_s": build_s,
        "runs": [],
    }
    runs_root = p.root / "scaling"
    for k, n in enumerate(ns):
        left = a.budget - (time.perf_counter() - t_start) - REPORT_RESERVE_S
        later = len(ns) - k - 1
        avail = left - RUN_OVERHEAD_S - later * (MIN_RUN_S + RUN_OVERHEAD_S)  # later runs keep MIN_RUN_S each
        if n == 1:  # the reference every speed-up needs: it goes first, and later runs give way to it
            avail = max(avail, min(a.max_seconds, left - RUN_OVERHEAD_S))
        limit = min(a.max_seconds, avail)
        if avail < MIN_RUN_S:
            rep["skipped"].append(f"N={n}: no time left in the budget ({left:.0f} s)")
            log(rep["skipped"][-1])
            continue
        r = one_run(s, p, n, gpu, limit, max(limit + RUN_OVERHEAD_S, min(limit + 2 * RUN_OVERHEAD_S, left)), a.extra)
        rep["runs"].append(r)
        for x in rep["runs"]:
            x["vs_n1"] = compare(base_run(rep), x)
        rep["wall_s"] = time.perf_counter() - t_start
        write_report(rep, runs_root, Path(a.out))
    rep["wall_s"] = time.perf_counter() - t_start
    path = write_report(rep, runs_root, Path(a.out))
    log(f"wrote {path.with_suffix('.md')}, .json, -logs.tgz ({rep['wall_s']:.0f} s)")
    print_summary(rep)
    return 0 if rep["runs"] and all(r["rc"] == 0 for r in rep["runs"]) else 1


def _on_term(signum, frame):
    Runner.stop(5.0)
    raise SystemExit(f"stopped by signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)  # as a script only: tests call main() in their own process
    sys.exit(main())
