"""How much the order of the back-projection's additions moves a classification's maps: the GPU's atomic adds come in
no fixed order, so two GPU runs of one job differ by this much at least. On the CPU (deterministic), the job of
tests/classify/test_host_references.py (60 particles, box 32, K=3, one iteration) runs twice with every insertion's
slices in another random order, with RELION 3.1's gridding as we run it (the first iteration in float64, the others in
float32) and all in float64; prints each class map's largest difference over its peak.

usage: python bench/insertion_order.py WORKDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from small_set import small_run_flags, small_set  # noqa: E402

from cryorefine.cli.main import main as cli  # noqa: E402
from cryorefine.io.mrc import read_map  # noqa: E402
from cryorefine.projection import insert  # noqa: E402
from cryorefine.reconstruction import reconstruct  # noqa: E402

K = 3


def run(data: Path, out: Path, seed: int) -> None:
    """The job with each insertion's slices in a random order drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    plain = insert.BackProjector.insert

    def shuffled(self, rotations, ky, kx, values, weights):
        p = torch.randperm(rotations.shape[0], generator=g)
        return plain(self, rotations[p], ky, kx, values[p], weights[p])

    insert.BackProjector.insert = shuffled
    try:
        argv = ["classify", *small_run_flags(data, out), "--K", str(K), "--iter", "1", "--random_seed", "4"]
        assert cli(argv) == 0
    finally:
        insert.BackProjector.insert = plain


def differences(a: Path, b: Path) -> list[float]:
    out = []
    for k in range(1, K + 1):
        name = f"run_it001_class{k:03d}.mrc"
        x, y = read_map(a / name)[0], read_map(b / name)[0]
        out.append(float(np.abs(x - y).max() / np.abs(x).max()))
    return out


def main() -> None:
    work = Path(sys.argv[1])
    data = small_set(work / "data", 32, 6.0, 60, seed=8)
    run(data, work / "a", 1)
    run(data, work / "b", 2)
    print("gridding as run (float64, then float32):", differences(work / "a", work / "b"))
    plain = reconstruct.gridding_weights

    def all_float64(weight, inside, iterations, size, devices, padded_size=None):
        start = inside.to(torch.float64)
        return reconstruct._gridding_iterations(start, weight, inside, iterations, size, devices, padded_size)

    reconstruct.gridding_weights = all_float64
    try:
        run(data, work / "c", 1)
        run(data, work / "d", 2)
    finally:
        reconstruct.gridding_weights = plain
    print("gridding all in float64:", differences(work / "c", work / "d"))


if __name__ == "__main__":
    main()
