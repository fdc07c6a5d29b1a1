"""The M-step's first use of a window on a machine: reconstruct() of random accumulators at a list of windows, each
timed twice in one process (its first call pays cuFFT's plans for the window's gridding grid, 4·window + 3 points, and
whatever the machine compiles the first time it meets those sizes; the second call is the steady state).

Run it twice in fresh processes on a fresh machine: a first-use cost that the second process pays again is the
process's (plans: a thread could make them early); one that only the first process pays is the machine's (a compile
kept on its disk: a benchmark's first run on a fresh machine pays it, a user's later runs do not). Issue 23: on H100s
the first betagal-like run of a machine took 0.3-0.9 s in the M-step at each new window, later runs 0.0-0.2 s
(bench/results/2026-12-06f-device-runs.md).

usage: python bench/mstep_first_use.py OUT.json [--box 100] [--pad 2] [--windows 19,32,37,43,44,45,50] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cryorefine.projection.extract import window_grid_size
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.reconstruct import gridding_grid_size, reconstruct


def timed_reconstruct(box: int, pad: int, window: int, device: str) -> float:
    """Seconds of one reconstruct() of random accumulators over ``window`` shells (RELION 3.1's 10 gridding
    iterations, regularised), the device synchronised before and after."""
    size = window_grid_size(window + 0.5, box, pad)
    bp = BackProjector.zeros(box, pad, device=device, size=size)
    g = torch.Generator(device=device).manual_seed(window)
    bp.data.real.normal_(generator=g)
    bp.weight.uniform_(generator=g)
    tau2 = torch.linspace(2.0, 0.01, box // 2 + 1, dtype=torch.float64)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    reconstruct(bp, tau2, max_shell=window, particles=1000.0)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--box", type=int, default=100)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--windows", default="19,32,37,43,44,45,50")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    rows = []
    for w in (int(x) for x in a.windows.split(",")):
        first = timed_reconstruct(a.box, a.pad, w, a.device)
        second = timed_reconstruct(a.box, a.pad, w, a.device)
        rows.append({"window": w, "grid": gridding_grid_size(a.pad, w), "first_s": first, "second_s": second})
        print(f"window {w:4d} (grid {rows[-1]['grid']:4d}): first {first:.3f} s, second {second:.3f} s", flush=True)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    with open(a.out, "w") as f:
        json.dump({"device": name, "box": a.box, "pad": a.pad, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
