"""TF32's effect on a whole refinement, emulated on the CPU (which has no TF32): bench/fidelity_ours.py's auto-refine
of a fidelity set with --precision tf32, where both operands of every coarse-pass matrix product are first rounded
to TF32 (10 explicit mantissa bits, to nearest, ties to even, as the tensor cores read float32 operands) and then
multiplied in float32. Everything else is the fp32 run's. Compare its judgement with fp32 runs of several seeds
(bench/results/2026-12-04-fidelity-sym-seeds.md) to tell TF32's effect from run-to-run scatter.

usage: python bench/tf32_emulation.py SETDIR OUTDIR [--seed N] [--j N]
Writes OUTDIR/<set>-tf32emu-seedN.json (fidelity_ours.py's judgement) and the run under SETDIR/tf32emu_seedN/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_ours  # noqa: E402

import cryorefine.estep.diff2 as diff2  # noqa: E402

MANTISSA_DROP = 13  # float32 keeps 23 explicit mantissa bits, TF32 10


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to TF32's precision (round to nearest, ties to even), still stored as float32."""
    bits = x.contiguous().view(torch.int32)
    half = (1 << (MANTISSA_DROP - 1)) - 1
    rounded = (bits + half + ((bits >> MANTISSA_DROP) & 1)) & ~((1 << MANTISSA_DROP) - 1)
    return rounded.view(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setdir"), ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--j", type=int, default=2)
    a = ap.parse_args()
    product = diff2.matmul_nt

    def emulated(x, y, precision="fp32"):
        return product(to_tf32(x), to_tf32(y), "fp32") if precision == "tf32" else product(x, y, precision)

    diff2.matmul_nt = emulated
    flags = fidelity_ours.relion_flags
    fidelity_ours.relion_flags = lambda meta, seed=0: [*flags(meta, seed), "--precision", "tf32"]
    label = f"tf32emu_seed{a.seed}"
    sys.argv = [sys.argv[0], a.setdir, a.outdir, "--j", str(a.j), "--seed", str(a.seed), "--label", label]
    fidelity_ours.main()


if __name__ == "__main__":
    main()
