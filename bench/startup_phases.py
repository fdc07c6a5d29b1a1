"""Where a fresh `cryorefine refine` process spends the time outside its iterations (issue 23's start-up of at most
2 s): each phase as seconds since the process started, as a user's shell would see it. bench/paper_bench.py runs
its jobs inside a process that has imported torch and started CUDA already, so its start-up leaves these out.

usage: python bench/startup_phases.py SET OUT.json [--workdir DIR] [--gpu] [--extra "FLAGS"] [--profile OUT.txt]
SET: a bench/paper_bench.py set whose data `paper_bench.py build SET` made under DIR (default /tmp/cryobench).

The job runs as its own process (this script, in child mode) with marks at: the interpreter up, torch imported, CUDA
started (--gpu: a first tensor on the device), cryorefine's command line imported, the first E-step batch (the run's
own StageTimer.first_batch), the run's end (main returned); the process's end is read here. Writes OUT.json (the
marks, the run's summary, the command) and prints one line per phase.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(marks_path: str, profile_path: str, argv: list[str]) -> int:
    """The job, with its marks written to ``marks_path`` as it ends (seconds since the process started: the marks are
    taken on this clock and placed by /proc's start time once cryorefine, which reads it, is imported). Unless
    ``profile_path`` is "-", cProfile's table of the main thread from "cryorefine imported" to the first E-step
    batch goes there (by cumulative and by own time)."""
    clock: dict[str, float] = {"interpreter up": time.perf_counter()}

    def mark(name: str) -> None:
        clock[name] = time.perf_counter()

    import torch

    mark("torch imported")
    if "--gpu" in argv:
        torch.zeros(1, device="cuda")
        mark("CUDA started")
    from cryorefine.cli.main import main
    from cryorefine.refine import timing

    mark("cryorefine imported")
    age = timing.seconds_since_process_start() or 0.0
    started = time.perf_counter() - age  # the process's start on this clock
    first_batch = timing.StageTimer.first_batch

    def noted(self) -> None:
        if "first E-step batch" not in clock:
            mark("first E-step batch")
        first_batch(self)

    timing.StageTimer.first_batch = noted  # type: ignore[method-assign]
    if profile_path != "-":
        profiler = cProfile.Profile()

        def noted_and_profiled(self) -> None:
            if "first E-step batch" not in clock:
                profiler.disable()
                with open(profile_path, "w") as f:
                    for order in ("cumulative", "tottime"):
                        pstats.Stats(profiler, stream=f).sort_stats(order).print_stats(60)
                    # who waits on other threads' locks and who hashes (Triton's key, meant for a thread of its
                    # own): 0.76 s of waits and 0.46 s of hashing in the main thread on an H100 (2026-12-06d)
                    f.write("\nCallers of the main thread's waits and hashing:\n")
                    pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_callers(
                        r"threading.py.*\(wait\)|\(result\)|\(join\)|_thread.lock|_hashlib"
                    )
            noted(self)

        timing.StageTimer.first_batch = noted_and_profiled  # type: ignore[method-assign]
        profiler.enable()
    try:
        rc = main(argv)
    finally:
        mark("run ended (main returned)")
        Path(marks_path).write_text(json.dumps({name: at - started for name, at in clock.items()}))
    return int(rc or 0)


def set_command(set_: str, workdir: str, gpu: bool, extra: str, out_root: str) -> list[str]:
    """The refine/classify command line of a paper_bench set (its data under ``workdir``), to ``out_root``."""
    sys.path.insert(0, str(HERE))
    import paper_bench

    s = paper_bench.SETS[set_]
    data = Path(workdir) / set_ / "data"
    cmd = "classify" if s.job == "class3d" else "refine"
    particles, reference = data / "particles_noposes.star", data / f"init{int(s.ini_high)}.mrc"
    argv = [cmd, "--i", str(particles), "--o", out_root, "--ref", str(reference)]
    return argv + list(s.our_flags) + (["--gpu"] if gpu else []) + shlex.split(extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set")
    ap.add_argument("out")
    ap.add_argument("--workdir", default="/tmp/cryobench")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--extra", default="", help="more flags for the job")
    ap.add_argument("--profile", default="-", help="cProfile of the start-up (to the first batch) into this file")
    a = ap.parse_args(argv)
    run_dir = Path(a.workdir) / a.set / "startup"
    run_dir.mkdir(parents=True, exist_ok=True)
    job = set_command(a.set, a.workdir, a.gpu, a.extra, str(run_dir / "run"))
    marks_path = run_dir / "marks.json"
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", str(marks_path), a.profile, *job],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return p.returncode
    marks = json.loads(marks_path.read_text())
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    marks["process ended"] = wall  # from this side: the exec's own start is ~ms
    result = {"set": a.set, "command": ["cryorefine", *job], "marks_s": marks, "run_s": summary.get("seconds"),
              "summary": summary, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    Path(a.out).write_text(json.dumps(result, indent=1))
    last = 0.0
    for name, at in marks.items():
        if at is not None:
            print(f"{at:7.2f} s  (+{at - last:5.2f})  {name}")
            last = at
    print(f"the run's own clock: {summary.get('seconds', float('nan')):.2f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        code = child(sys.argv[2], sys.argv[3], sys.argv[4:])
        sys.stdout.flush()
        os._exit(code)  # as the `cryorefine` program ends (cli.main.console)
    sys.exit(main())
