"""Issue 20's mixed pixel sizes check: does a set of two optics groups at different pixel sizes and boxes refine to
the truth as well as a one-group set of the same size, and what does getting the second group's pixel size wrong
cost?

Three auto-refines of the packaged 6msm model (simulate: each group projected from the atomic model at its own pixel
size), each from particles_noposes.star and the first group's truth low-passed to 30 Å, with bench/optics_fidelity.py's
flags:
  one_group   N particles at 1.2 Å/px, box 128
  two_groups  N/2 of them at 1.2 Å/px, box 128, and N/2 at 1.3 Å/px, box 118 (the map on the first group's grid)
  wrong       the two-group set with the second group's pixel size written as 1.2 Å (the control)
Each run's gold-standard resolution, FSC-to-truth (0.5) of the final map and pose errors go to
OUTDIR/mixed-optics.{json,md} with the device, date, commit and command.

usage: python bench/mixed_optics.py OUTDIR [--gpu] [--n 6000] [--snr 0.1] [--second 1.3:118]
       [--runs one_group,two_groups,wrong] [--supersample 2]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import starfile
import torch

from cryorefine.density import atoms_to_map, band_limited_map, packaged_model, read_atoms
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.simulate import simulate_particles

sys.path.insert(0, str(Path(__file__).parent))
from optics_fidelity import ANGPIX, bench_folders, bench_parser, refine, write_results  # noqa: E402  (the same refinement and figures)

BOX = 128
SECOND = "1.3:118"  # the second optics group, Å/px:box (153.4 Å against the first's 153.6 Å)


def truth_at(xyz, w, angpix: float, box: int, supersample: int) -> torch.Tensor:
    """The atomic model's map at ``angpix`` in a ``box``: splatted there, or at 1/``supersample`` of the pixel size
    and binned (density.band_limited_map)."""
    if supersample == 1:
        return atoms_to_map(xyz, w, box, angpix, 50.0)
    return band_limited_map(xyz, w, box, angpix, 50.0, supersample).float()


def build(root: Path, n: int, snr: float, second_group: tuple[float, int], supersample: int) -> dict:
    xyz, w = read_atoms(packaged_model())
    truth = truth_at(xyz, w, ANGPIX, BOX, supersample)
    one = simulate_particles(truth, ANGPIX, root / "one_group", n, snr=snr, seed=7)
    second = (truth_at(xyz, w, second_group[0], second_group[1], supersample), second_group[0])
    simulate_particles(truth, ANGPIX, root / "two_groups", n, snr=snr, seed=7, noise_sigma=one["noise_sigma"],
                       more_groups=[second])  # fmt: skip
    blocks = starfile.read(root / "two_groups" / "particles_noposes.star")
    blocks["optics"].loc[1, "rlnImagePixelSize"] = ANGPIX
    starfile.write(blocks, root / "two_groups" / "wrong_noposes.star", overwrite=True)
    t, _ = read_map(root / "one_group" / "truth.mrc")
    write_map(root / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX)
    return {"n": n, "snr": snr, "groups": [[ANGPIX, BOX], list(second_group)], "supersample": supersample}


def main(argv=None) -> int:
    ap = bench_parser("/tmp/mixed_optics")
    ap.add_argument("--second", default=SECOND, help="the second optics group, Å/px:box")
    ap.add_argument("--runs", default="one_group,two_groups,wrong", help="which of the three runs, comma-separated")
    ap.add_argument("--supersample", type=int, default=1, help="make the truths at this finer sampling, then bin")
    a = ap.parse_args(argv)
    out, root, how = bench_folders(a)
    angpix, box = a.second.split(":")
    diameter = round(0.85 * BOX * ANGPIX)
    t0 = time.perf_counter()
    meta = build(root, a.n, a.snr, (float(angpix), int(box)), a.supersample)
    meta["simulate_seconds"] = round(time.perf_counter() - t0, 1)
    sets = {
        "one_group": (root / "one_group/particles_noposes.star", root / "one_group"),
        "two_groups": (root / "two_groups/particles_noposes.star", root / "two_groups"),
        "wrong": (root / "two_groups/wrong_noposes.star", root / "two_groups"),
    }
    runs = {
        name: refine(root, name, star, truth, diameter, how)
        for name, (star, truth) in sets.items()
        if name in a.runs.split(",")
    }
    print(write_results(out / "mixed-optics", "Mixed pixel sizes", a.gpu, meta, runs, lambda r: (
        f"`{r['command']}`: {meta['n']} particles, SNR {meta['snr']}; optics groups (Å/px, box) {meta['groups']} "
        f"(two_groups: half in each; wrong: the second written as {ANGPIX} Å/px)."
    )))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
