"""The back-projection kernel alone (projection/insert_kernel.py) at a local search's size: the slices of many nearby
rotations (each particle's fine rotations about its pose) inserted into the window's padded grid with each reduction
width the GPU has (insert_kernel.WIDTHS: scalar atomic adds, (re, im) pair and (re, im, weight) quad reductions),
alternating, timed by CUDA events; and each grid's difference from the scalar one (the order of the float additions).

usage: python bench/insert_timing.py OUTDIR [--box 100] [--pad 2] [--window 45] [--rotations 60000] [--repeats 3]
Defaults: betagal-like's order-6 local iterations (box 100, window 45 shells; ~60,000 fine rotations with weight in
a tile of ~900 particles).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection import insert_kernel
from cryorefine.projection.extract import window_grid_size
from cryorefine.projection.insert import BackProjector


def window_pixels(box: int, max_shell: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ky, kx) of the rfft half plane's pixels with 0 < radius <= max_shell."""
    ky, kx = torch.meshgrid(
        torch.arange(-box // 2, box // 2, dtype=torch.float32, device=device),
        torch.arange(0, box // 2 + 1, dtype=torch.float32, device=device),
        indexing="ij",
    )
    r = torch.sqrt(ky**2 + kx**2)
    keep = (r > 0) & (r <= max_shell)
    return ky[keep], kx[keep]


def local_rotations(n: int, per_particle: int, spread_deg: float, device) -> torch.Tensor:
    """(n·per_particle, 3, 3): for n random poses, per_particle rotations within ``spread_deg`` of each."""
    g = torch.Generator().manual_seed(0)
    poses = torch.rand(n, 1, 3, generator=g) * torch.tensor([360.0, 180.0, 360.0])
    near = poses + (torch.rand(n, per_particle, 3, generator=g) - 0.5) * spread_deg
    e = near.reshape(-1, 3).double()
    return euler_to_matrix(e[:, 0], e[:, 1], e[:, 2]).float().to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--box", type=int, default=100)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--window", type=int, default=45, help="the window's last shell")
    ap.add_argument("--rotations", type=int, default=60000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device("cuda")
    ky, kx = window_pixels(a.box, a.window, dev)
    rot = local_rotations(a.rotations // 64, 64, 4.0, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    values = torch.randn(rot.shape[0], ky.numel(), dtype=torch.complex64, device=dev, generator=g)
    weights = torch.rand(rot.shape[0], ky.numel(), device=dev, generator=g)
    size = window_grid_size(a.window + 0.5, a.box, a.pad)
    names = {1: "scalar atomics", 2: "pair reductions", 4: "quad reductions"}
    widest = insert_kernel.reduction_width(torch.cuda.get_device_capability(dev), 0)
    variants = {names[w]: w for w in insert_kernel.WIDTHS if w <= widest}
    grids, times = {}, {name: [] for name in variants}
    for _ in range(a.repeats + 1):  # the first round compiles the kernels
        for name, width in variants.items():
            bp = BackProjector.zeros(a.box, a.pad, device=dev, size=size)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            insert_kernel.insert_fused(bp.data, bp.weight, a.pad, rot, ky, kx, values, weights, width=width)
            stop.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(stop) / 1000.0)
            grids[name] = bp
    points = rot.shape[0] * ky.numel()
    out = {
        "device": torch.cuda.get_device_name(dev),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/insert_timing.py "
        + " ".join(f"--{k} {v}" for k, v in vars(a).items() if k != "outdir"),
        "grid": size,
        "rotations": rot.shape[0],
        "pixels": ky.numel(),
        "seconds (first round compiles)": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "points per second (best)": {k: f"{points / min(v[1:]):.3e}" for k, v in times.items()},
    }
    s = grids["scalar atomics"]
    out["max relative difference from scalar atomics (data, weight)"] = {
        k: [
            float((s.data - v.data).abs().max() / s.data.abs().max()),
            float((s.weight - v.weight).abs().max() / s.weight.abs().max()),
        ]
        for k, v in grids.items()
        if k != "scalar atomics"
    }
    Path(a.outdir).mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, indent=1)
    (Path(a.outdir) / "insert_timing.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
