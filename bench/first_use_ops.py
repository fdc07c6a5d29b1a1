"""Which of a GPU run's torch calls pay a first-use cost (issue 23: betagal-like's first two iterations took ~0.5 s
longer than the steady ones on an H100, on top of the start-up): a paper benchmark's auto-refine in this process with
every torch call of the run's thread timed (the device synchronised before and after), each kind of call (function,
and its tensors' dtypes and devices) by its first time against the median of its later ones. CUDA loads a kernel's
module at its first launch (lazy loading) and cuFFT makes a plan per transform shape: both land on the first call.

usage (device): python bench/first_use_ops.py OUT.json --set SET [MORE_REFINE_ARGS]   (e.g. --set betagal --gpu)
Data from `paper_bench.py build SET` in /tmp/cryobench/SET/data; the run goes to /tmp/first_use_ops/SET.
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: CRYOREFINE_SRC wins
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cryorefine.cli import main as cli  # noqa: E402
from cryorefine.refine import loop  # noqa: E402
from startup_phases import set_command  # noqa: E402  (bench/: the script's folder)

SLOW_S = 0.002  # first calls reported: at least this long, and 3× their kind's later median


def _kind(func, args, kwargs) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
    tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
    return name + "(" + ",".join(f"{str(t.dtype)[6:]}@{t.device.type}" for t in tensors[:3]) + ")"


def _site() -> str:
    frames = [f for f in traceback.extract_stack(limit=12)[:-2] if "src/cryorefine/" in f.filename]
    return f"{frames[-1].filename.split('src/cryorefine/')[-1]}:{frames[-1].lineno}" if frames else "?"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class FirstUse(TorchFunctionMode):
    """Times every torch call (synchronised); keeps each kind's first call (time, iteration, site) and later times."""

    def __init__(self) -> None:
        super().__init__()
        self.iteration = 0
        self.first: dict[str, dict] = {}
        self.later: dict[str, list[float]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _kind(func, args, kwargs)
        _sync()
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        _sync()
        dt = time.perf_counter() - t0
        if kind not in self.first:
            self.first[kind] = {"s": dt, "iteration": self.iteration, "site": _site()}
        else:
            self.later.setdefault(kind, []).append(dt)
        return out


def main() -> None:
    out, at = sys.argv[1], sys.argv.index("--set")
    name = sys.argv[at + 1]
    run = Path("/tmp/first_use_ops") / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    argv = set_command(name, "/tmp/cryobench", False, shlex.join(sys.argv[at + 2 :]), str(run / "run"))
    mode = FirstUse()
    iterate = loop.iterate

    def counted(*a, **k):
        mode.iteration += 1
        return iterate(*a, **k)

    loop.iterate = counted
    with mode:
        rc = cli.main(argv)
    rows = []
    for kind, first in mode.first.items():
        later = mode.later.get(kind, [])
        median = statistics.median(later) if later else float("nan")
        if first["s"] >= SLOW_S and not (first["s"] < 3 * median):
            rows.append({"kind": kind, **first, "later_median_s": median, "later_calls": len(later)})
    rows.sort(key=lambda r: -r["s"] + (r["later_median_s"] if r["later_median_s"] == r["later_median_s"] else 0))
    Path(out).write_text(json.dumps({"rc": rc, "argv": argv, "slow_first_calls": rows}, indent=1))
    print(f"{'first s':>8} {'later s':>8} {'n':>5}  it  kind  [site]")
    for r in rows[:60]:
        print(
            f"{r['s']:8.4f} {r['later_median_s']:8.4f} {r['later_calls']:5d} {r['iteration']:3d}  {r['kind']}  "
            f"[{r['site']}]"
        )
    extra = sum(r["s"] - (r["later_median_s"] if r["later_calls"] else 0) for r in rows)
    print(f"first calls over later medians, summed: {extra:.3f} s")


if __name__ == "__main__":
    main()
