"""--scale per micrograph group beside RELION 3.1.3: the set of tests/refine/test_group_scale_refine.py (each
micrograph's signal multiplied by a known scale from 0.7-1.3), auto-refined (and classified, K=2) from the STAR without
angles by cryorefine and by relion_refine(_mpi) --scale; each one's rlnGroupScaleCorrection against the truth and
against the other's.

    .venv/bin/python bench/scale_groups.py OUT [--mics 16 --per_mic 25 --snr 0.5 --iter 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "refine"))

from test_group_scale_refine import COMMON, group_scales, scaled_set  # noqa: E402

from cryorefine.cli.main import main  # noqa: E402
from cryorefine.io.star import read_star  # noqa: E402
from cryorefine.simulate import NO_POSES_STAR  # noqa: E402

RELION_COMMON = (
    "--particle_diameter 170 --ctf --flatten_solvent --zero_mask --offset_range 2 --offset_step 1 --healpix_order 1 "
    "--pad 2 --random_seed 3 --scale --dont_combine_weights_via_disc --ctf_corrected_ref"
)


def compare(truth: pd.Series, runs: dict[str, Path]) -> dict:
    """Each run's scales (by micrograph group name) against the truth (by the same names) and against each other."""
    got = {k: group_scales(v)[truth.index].to_numpy() for k, v in runs.items()}
    true = truth.to_numpy()
    out: dict = {f"{k} r(truth)": float(np.corrcoef(v, true)[0, 1]) for k, v in got.items()}
    keys = list(got)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            out[f"r({a}, {b})"] = float(np.corrcoef(got[a], got[b])[0, 1])
            out[f"max |{a} - {b}|"] = float(np.abs(got[a] - got[b]).max())
    out["truth sd"] = float(true.std())
    out.update({f"{k} sd": float(v.std()) for k, v in got.items()})
    return out


def final_model(folder: Path) -> Path:
    """An auto-refine's run_model.star (written when it converged), else its last half-set 1 model."""
    final = folder / "run_model.star"
    return final if final.is_file() else sorted(folder.glob("run_it*_half1_model.star"))[-1]


def run(out: Path, mics: int, per_mic: int, snr: float, iters: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    truth = scaled_set(out, mics, per_mic, snr)
    star, ref = out / NO_POSES_STAR, out / "start.mrc"
    flags = [*COMMON.split(), "--healpix_order", "1", "--random_seed", "3", "--scale"]
    limit = ["--iter", str(iters)] if iters > 0 else []  # 0: both auto-refines run to convergence
    main(["refine", "--i", str(star), "--o", str(out / "ours_refine/run"), "--ref", str(ref), "--ini_high", "30",
          *limit, *flags])  # fmt: skip
    main(["classify", "--i", str(star), "--o", str(out / "ours_class/run"), "--ref", str(ref), "--ini_high", "30",
          "--K", "2", "--tau2_fudge", "4", "--iter", "4", *flags])  # fmt: skip
    for sub in ("relion_refine", "relion_class"):
        (out / sub).mkdir(exist_ok=True)
    with open(out / "relion_refine.log", "w") as log:
        subprocess.run(
            ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi", "--i", str(star),
             "--o", "relion_refine/run", "--ref", str(ref), "--ini_high", "30", "--auto_refine",
             "--split_random_halves", *(["--auto_iter_max", str(iters)] if iters > 0 else []), "--j", "1",
             *RELION_COMMON.split()],
            cwd=out, stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    with open(out / "relion_class.log", "w") as log:
        subprocess.run(
            ["relion_refine", "--i", str(star), "--o", "relion_class/run", "--ref", str(ref), "--ini_high", "30",
             "--K", "2", "--tau2_fudge", "4", "--iter", "4", "--j", "2", *RELION_COMMON.split()],
            cwd=out, stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    last = lambda d, pattern: sorted((out / d).glob(pattern))[-1]  # noqa: E731
    return {
        "refine_resolution_angst": {  # the final model's (run_model.star), else the last iteration's
            k: float(read_star(final_model(out / d))["model_general"]["rlnCurrentResolution"].iloc[0])
            for k, d in (("ours", "ours_refine"), ("relion", "relion_refine"))
        },
        "refine": compare(
            truth,
            {
                "ours": last("ours_refine", "run_it*_half1_model.star"),
                "relion": last("relion_refine", "run_it*_half1_model.star"),
            },
        ),
        "classify": compare(
            truth,
            {"ours": out / "ours_class/run_it004_model.star", "relion": out / "relion_class/run_it004_model.star"},
        ),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mics", type=int, default=16)
    p.add_argument("--per_mic", type=int, default=25)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--iter", type=int, default=6, help="auto-refine iterations (0: to convergence)")
    a = p.parse_args()
    print(json.dumps(run(a.out.resolve(), a.mics, a.per_mic, a.snr, a.iter), indent=1))
