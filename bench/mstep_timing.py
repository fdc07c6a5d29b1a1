"""The M-step's reconstruction alone at a large box: reconstruct() of random accumulators on the GPU and on the host
(RELION 3.1's 10 gridding iterations), whole grid and a window, with the GPU's peak memory; the figures the memory
plan's GPU-or-host choice trades between.

usage: python bench/mstep_timing.py OUTDIR [--box 450] [--pad 2] [--window 100] [--devices cuda,cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cryorefine.estep import memory
from cryorefine.projection.extract import window_grid_size
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.reconstruct import reconstruct


def one(box: int, pad: int, max_shell: int, device: str) -> dict:
    size = window_grid_size(max_shell + 0.5 if max_shell < box // 2 else None, box, pad)
    bp = BackProjector.zeros(box, pad, device=device, size=size)
    g = torch.Generator(device=device).manual_seed(0)
    bp.data.real.normal_(generator=g)
    bp.weight.uniform_(generator=g)
    tau2 = torch.linspace(2.0, 0.01, box // 2 + 1, dtype=torch.float64)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    reconstruct(bp, tau2, max_shell=max_shell, gridding_iterations=10, particles=100.0)
    if device == "cuda":
        torch.cuda.synchronize()
    out = {"device": device, "box": box, "pad": pad, "max_shell": max_shell, "grid": size,
           "seconds": round(time.perf_counter() - t0, 2),
           "predicted_gib": round(memory.reconstruct_bytes(box, pad, size, max_shell) / memory.GIB, 2)}  # fmt: skip
    if device == "cuda":
        out["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / memory.GIB, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--box", type=int, default=450)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--devices", default="cuda,cpu")
    a = ap.parse_args()
    rows = []
    for device in a.devices.split(","):
        for shell in (a.window, a.box // 2):
            rows.append(one(a.box, a.pad, shell, device))
            print(rows[-1], flush=True)
    Path(a.outdir).mkdir(parents=True, exist_ok=True)
    (Path(a.outdir) / "mstep-timing.json").write_text(json.dumps({"threads": torch.get_num_threads(), "runs": rows}))


if __name__ == "__main__":
    main()
