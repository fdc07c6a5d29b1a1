"""Where a run's end goes (issue 23: the betagal-like run's last 0.7-0.9 s on an H100 were its files and report.html,
with the GPU idle): an auto-refine run in this process with each of the last iteration's file jobs, the checkpoint
and the report's flush timed on the threads that run them (wall seconds from the run's last iteration's end).

usage: python bench/closing_jobs.py OUT.json -- REFINE_ARGS...   (`cryorefine refine`'s arguments)
       python bench/closing_jobs.py OUT.json --set SET [MORE_ARGS]  (a paper benchmark's auto-refine: paper_bench.py's
                                                                     flags and MORE_ARGS (e.g. --gpu), data in
                                                                     /tmp/cryobench/SET/data, run in /tmp/closing_jobs)
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: CRYOREFINE_SRC wins
from cryorefine.cli import main as cli  # noqa: E402
from cryorefine.io.background import BackgroundWriter  # noqa: E402
from cryorefine.refine import auto_refine, loop  # noqa: E402
from cryorefine.refine.report_refresh import ReportRefresher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup_phases import set_command  # noqa: E402  (bench/: the script's folder)

EVENTS: list[dict] = []
T0 = time.perf_counter()


def timed(name: str, fn):
    """``fn`` with its start and end recorded (seconds since this script began) under ``name``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter() - T0
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append(
                {
                    "job": name,
                    "start_s": round(start, 4),
                    "end_s": round(time.perf_counter() - T0, 4),
                    "thread": threading.current_thread().name,
                }
            )

    return wrapper


def job_name(job) -> str:
    f = getattr(job, "func", job)
    name = getattr(f, "__name__", repr(f))
    path = next((a for a in getattr(job, "args", ()) if isinstance(a, (str, list))), "")
    while isinstance(path, (list, tuple)):  # the first of several paths, or of (path, map) pairs
        path = path[0] if path else ""
    return f"{name} {Path(path).name}".strip()


def set_argv(name: str, more: list[str]) -> list[str]:
    """The command line of paper benchmark ``name`` on its data (paper_bench.py build) with ``more``, a clean start in
    /tmp/closing_jobs/NAME."""
    run = Path("/tmp/closing_jobs") / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    return set_command(name, "/tmp/cryobench", False, shlex.join(more), str(run / "run"))


def main() -> None:
    out = sys.argv[1]
    if "--" in sys.argv:
        rest = ["refine", *sys.argv[sys.argv.index("--") + 1 :]]
    else:
        at = sys.argv.index("--set")
        rest = set_argv(sys.argv[at + 1], sys.argv[at + 2 :])
    side_by_side = auto_refine.side_by_side
    auto_refine.side_by_side = lambda jobs, threads, **kw: side_by_side(
        [timed(job_name(j), j) for j in jobs], threads, **kw
    )
    loop.write_checkpoint = timed("write_checkpoint", loop.write_checkpoint)
    loop.iterate = timed("iteration", loop.iterate)
    ReportRefresher.flush = timed("report flush", ReportRefresher.flush)
    BackgroundWriter.close = timed("writer close", BackgroundWriter.close)
    submit = auto_refine.steps.submit_report
    auto_refine.steps.submit_report = timed("submit_report", submit)
    rc = cli.main(rest)
    ends = [e["end_s"] for e in EVENTS if e["job"] == "iteration"]
    last = ends[-1] if ends else 0.0
    tail = [dict(e, start_s=round(e["start_s"] - last, 4), end_s=round(e["end_s"] - last, 4)) for e in EVENTS]
    tail = [e for e in tail if e["end_s"] > 0]
    report = {"rc": rc, "argv": rest, "last_iteration_end_s": last, "script_end_s": time.perf_counter() - T0}
    Path(out).write_text(json.dumps({**report, "after_last_iteration": tail}, indent=1))
    for e in sorted(tail, key=lambda e: e["start_s"]):
        took = e["end_s"] - max(e["start_s"], 0)
        print(f"{e['start_s']:8.3f} {e['end_s']:8.3f} {took:7.3f} s  {e['job']}  [{e['thread']}]")
    print(f"script ended {report['script_end_s'] - last:.3f} s after the last iteration")


if __name__ == "__main__":
    main()
