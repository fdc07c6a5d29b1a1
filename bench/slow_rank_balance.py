"""The task pool balancing unequal workers: a 2-rank CPU refinement (torchrun, gloo) with rank 1 slowed down.

usage: python bench/slow_rank_balance.py OUT_DIR [SLOW_SECONDS_PER_BATCH]
Simulates a small set (box 24, 8 Å/px, 192 particles, batches of 8), runs `torchrun --nproc_per_node 2 cryorefine
refine` with CRYOREFINE_SLOW_RANK=1:S (rank 1 sleeps S seconds after each batch) and prints, per iteration, the
batches each rank took (from run.log) as a markdown table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.mixture import state_maps
from cryorefine.simulate import simulate_particles

BOX, ANGPIX, N, BATCH = 24, 8.0, 192, 8


def main():
    out = Path(sys.argv[1])
    slow = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    data = out / "data"
    if not (data / "particles.star").exists():
        simulate_particles(state_maps(BOX, ANGPIX, 100.0)[0], ANGPIX, data, N, snr=0.5, seed=5, max_shift_angst=3.0)
        t, _ = read_map(data / "truth.mrc")
        write_map(
            data / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX
        )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cryorefine.cli.main",
        "refine",
        "--i",
        str(data / "particles_noposes.star"),
        "--o",
        str(out / "run" / "run"),
        "--ref",
        str(data / "start.mrc"),
        "--ini_high",
        "30",
        "--particle_diameter",
        "170",
        "--ctf",
        "--flatten_solvent",
        "--healpix_order",
        "1",
        "--offset_range",
        "2",
        "--offset_step",
        "1",
        "--iter",
        "4",
        "--random_seed",
        "3",
        "--j",
        "1",
        "--batch",
        str(BATCH),
    ]
    t0 = time.time()
    subprocess.run(cmd, env={**os.environ, "CRYOREFINE_SLOW_RANK": f"1:{slow}"}, check=True, capture_output=True)
    wall = time.time() - t0
    rows = re.findall(r"iter +(\d+).*?batches/rank (\d+)/(\d+)", (out / "run" / "run.log").read_text())
    print(
        f"2 CPU ranks (gloo), rank 1 slowed by {slow} s per batch; {N} particles in batches of {BATCH} "
        f"({2 * -(-N // 2 // BATCH)} batches per iteration); wall {wall:.0f} s\n"
    )
    print("| iteration | batches rank 0 | batches rank 1 (slowed) |\n|---|---|---|")
    for it, a, b in rows:
        print(f"| {it} | {a} | {b} |")


if __name__ == "__main__":
    main()
