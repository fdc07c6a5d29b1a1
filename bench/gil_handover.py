"""How long a helper thread that reads and hashes files (as Triton's cache key does, projection/triton_cache_key.py)
takes while the run's thread is busy in Python, at Python's default interpreter-lock hand-over (5 ms) and at
thread_switches.SWITCH_INTERVAL_S (0.2 ms), alternating.

usage: python bench/gil_handover.py OUT.md [--files 400] [--busy_s 1.5] [--repeats 2]
The helper hashes the first --files of torch's own .py files (Triton's key hashes its sources and library); the run's
thread runs a pure-Python loop for --busy_s seconds (STAR parsing, bookkeeping). Writes a table to OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from cryorefine.thread_switches import SWITCH_INTERVAL_S


def hash_files(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def helper_seconds(files: list[str], busy_s: float, interval_s: float) -> float:
    """Seconds from the helper's start to its end while this thread stays busy in Python for ``busy_s``."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    done: dict[str, float] = {}
    t0 = time.perf_counter()

    def helper() -> None:
        hash_files(files)
        done["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    x = 0
    while time.perf_counter() - t0 < busy_s:
        for i in range(1000):
            x += i
    thread.join()
    sys.setswitchinterval(before)
    return done["s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--busy_s", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "**", "*.py"), recursive=True))[: a.files]
    t = time.perf_counter()
    hash_files(files)
    alone = time.perf_counter() - t
    rows = []
    for _ in range(a.repeats):
        for interval in (5e-3, SWITCH_INTERVAL_S):
            rows.append((interval, helper_seconds(files, a.busy_s, interval)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Interpreter-lock hand-over and a helper thread's progress",
        "",
        f"- {datetime.date.today()}, commit {commit}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"- `python bench/gil_handover.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- The helper hashes {len(files)} files: {alone:.2f} s alone. The run's thread is busy in Python for "
        f"{a.busy_s} s.",
        "",
        "| hand-over | helper done after (s) |",
        "|---|---|",
        *[f"| {interval * 1e3:.1f} ms | {s:.2f} |" for interval, s in rows],
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
