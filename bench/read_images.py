"""First reads of a stack's images (a run's start reads every image once): `read_images` of two source trees, each
in fresh processes, alternating, on one stack of float32 images written here (then in the page cache).

usage: python bench/read_images.py OUT.json [--old SRC] [--new SRC] [--n 8000] [--box 256] [--repeats 5]
       [--workdir DIR]
SRC: a src/ folder (e.g. `git archive REV src | tar -x -C DIR`, then DIR/src); --new defaults to this checkout's.
Writes OUT.json and OUT.md: seconds per repeat and GB/s for each tree, the machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMED = """
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
t = load_particles(sys.argv[2])
t0 = time.perf_counter()
for i in range(0, len(t), 1024):
    read_images(t, np.arange(i, min(len(t), i + 1024)))
print(time.perf_counter() - t0)
"""


def make_set(folder: Path, n: int, box: int) -> Path:
    """A stack of n random float32 images and a STAR file naming them, in ``folder``; returns the STAR file."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(HERE.parent / "src"))
    from cryorefine.io.mrc import StackWriter
    from cryorefine.io.star import write_star

    folder.mkdir(parents=True, exist_ok=True)
    stack, star = folder / "images.mrcs", folder / "images.star"
    if not stack.exists():
        with StackWriter(stack, n, box, 1.0) as w:
            for i in range(0, n, 500):
                k = min(500, n - i)
                w.write(i, np.random.default_rng(i).standard_normal((k, box, box), dtype=np.float32))
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnImagePixelSize": [1.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})  # fmt: skip
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)], "rlnOpticsGroup": 1,
                              "rlnDefocusU": 15000.0, "rlnDefocusV": 15000.0, "rlnDefocusAngle": 0.0})  # fmt: skip
    write_star(star, {"optics": optics, "particles": particles})
    return star


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--old", default=None)
    ap.add_argument("--new", default=str(HERE.parent / "src"))
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/read_images_bench")
    a = ap.parse_args(argv)
    star = make_set(Path(a.workdir), a.n, a.box)
    trees = {"new": a.new, **({"old": a.old} if a.old else {})}
    seconds: dict[str, list[float]] = {k: [] for k in trees}
    for _ in range(a.repeats):
        for name, src in trees.items():
            done = subprocess.run([sys.executable, "-c", TIMED, src, str(star)], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            seconds[name].append(round(float(done.stdout.strip().splitlines()[-1]), 3))
    gb = a.n * a.box * a.box * 4 / 1e9
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
              "commit": commit.stdout.strip(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "images": a.n, "box": a.box, "gigabytes": gb, "trees": trees, "seconds": seconds,
              "gb_per_s": {k: [round(gb / s, 2) for s in v] for k, v in seconds.items()}}  # fmt: skip
    Path(a.out).write_text(json.dumps(result, indent=1))
    lines = [f"# First reads of {a.n} images of {a.box} px ({gb:.2f} GB), read_images in fresh processes",
             "", f"{result['date']}, {result['machine']}, commit {result['commit']}: `{result['command']}`", "",
             "| tree | src | seconds per repeat | GB/s |", "|---|---|---|---|"]  # fmt: skip
    for k, v in seconds.items():
        lines.append(f"| {k} | {trees[k]} | {', '.join(map(str, v))} | {', '.join(map(str, result['gb_per_s'][k]))} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
