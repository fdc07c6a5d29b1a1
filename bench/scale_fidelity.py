"""Issue 20's micrograph-scale check: are per-micrograph intensity scales drawn from 0.7-1.3 recovered by `--scale`,
and does the scaled set refine to the resolution of the same set unscaled?

Two auto-refines of the packaged 6msm model at 1.2 Å/px, box 128 (simulate --micrographs: per-micrograph defocus,
the same poses, defocus and noise in both sets), each from particles_noposes.star and the truth low-passed to 30 Å,
with bench/optics_fidelity.py's flags (--norm --scale ...):
  unscaled   every micrograph's signal as simulated
  scaled     each micrograph's signal multiplied by U(0.7, 1.3) (micrographs_truth.star)
Each run's gold-standard resolution, FSC-to-truth and pose errors, and the correlation of the scaled run's
rlnGroupScaleCorrection (the last half-set 1 model.star) with the truth go to OUTDIR/scale-fidelity.{json,md}.

usage: python bench/scale_fidelity.py OUTDIR [--gpu] [--n 6000] [--micrographs 60] [--snr 0.1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_star
from cryorefine.refine.groups import after_job_folder
from cryorefine.simulate import MICROGRAPHS_TRUTH_STAR, Micrographs, simulate_particles

sys.path.insert(0, str(Path(__file__).parent))
from optics_fidelity import ANGPIX, bench_folders, bench_parser, refine, write_results  # noqa: E402  (the same refinement and figures)

BOX = 128


def build(root: Path, n: int, micrographs: int, snr: float) -> dict:
    truth = atoms_to_map(*read_atoms(packaged_model()), BOX, ANGPIX, 50.0)
    one = simulate_particles(truth, ANGPIX, root / "unscaled", n, snr=snr, seed=7, micrographs=Micrographs(micrographs))
    simulate_particles(truth, ANGPIX, root / "scaled", n, snr=snr, seed=7, noise_sigma=one["noise_sigma"],
                       micrographs=Micrographs(micrographs, scale=(0.7, 1.3)))  # fmt: skip
    t, _ = read_map(root / "unscaled" / "truth.mrc")
    write_map(root / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX)
    return {"n": n, "box": BOX, "angpix": ANGPIX, "snr": snr, "micrographs": micrographs}


def scale_recovery(run_dir: Path, truth_dir: Path) -> dict:
    """Pearson r of the last half-set 1 model.star's scales with the truth, and both spreads."""
    truth = read_star(truth_dir / MICROGRAPHS_TRUTH_STAR)["micrographs"]
    names = [after_job_folder(str(m)) for m in truth["rlnMicrographName"]]
    model = sorted(run_dir.glob("run_it*_half1_model.star"))[-1]
    groups = read_star(model)["model_groups"].set_index("rlnGroupName")["rlnGroupScaleCorrection"].astype(float)
    got, true = groups[names].to_numpy(), truth["rlnGroupScaleCorrection"].astype(float).to_numpy()
    return {
        "model": model.name, "r": round(float(np.corrcoef(got, true)[0, 1]), 4),
        "sd_found": round(float(got.std()), 4), "sd_truth": round(float((true / true.mean()).std()), 4),
    }  # fmt: skip


def main(argv=None) -> int:
    ap = bench_parser("/tmp/scale_fidelity")
    ap.add_argument("--micrographs", type=int, default=60)
    a = ap.parse_args(argv)
    out, root, how = bench_folders(a)
    diameter = round(0.85 * BOX * ANGPIX)
    t0 = time.perf_counter()
    meta = build(root, a.n, a.micrographs, a.snr)
    meta["simulate_seconds"] = round(time.perf_counter() - t0, 1)
    runs = {name: refine(root, name, root / name / "particles_noposes.star", root / name, diameter, how)
            for name in ("unscaled", "scaled")}  # fmt: skip
    if runs["scaled"].get("rc") == 0:
        meta["scale_recovery"] = scale_recovery(root / "scaled", root / "scaled")
    print(write_results(out / "scale-fidelity", "Micrograph scales", a.gpu, meta, runs, lambda r: (
        f"`{r['command']}`: {meta['n']} particles on {meta['micrographs']} micrographs, box {BOX}, {ANGPIX} Å/px, "
        f"SNR {meta['snr']}; scaled: each micrograph's signal × U(0.7, 1.3). Scales recovered (scaled run): "
        f"{meta.get('scale_recovery')}."
    )))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
