"""Judge two auto-refine results (ours, RELION) with one FSC tool on their unfiltered half maps and against the truth.

usage: python bench/compare_refine.py TRUTH_DIR OURS_ROOT RELION_ROOT OUT_PREFIX [--ours_label L] [--relion_label L]
       [--truth_star STAR] [--sym SYM]
TRUTH_DIR holds truth.mrc and particles.star with the true poses (or give --truth_star); *_ROOT are output roots (e.g.
dir/run). Pose errors are taken modulo --sym. For a RELION run that has not finished, its latest iteration's half maps
and data.star are used (and marked as such). Also: iterations (RELION's final iteration has no number: counted as one
more) and the last HEALPix order with its fine (oversampled) angular step.
Writes OUT_PREFIX.json and OUT_PREFIX.table.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import subprocess
from pathlib import Path

import torch

from cryorefine.evaluation import pose_errors, read_poses, summarise_pose_errors
from cryorefine.io.mrc import read_map
from cryorefine.reconstruction.fsc import fsc_curve, resolution_angstrom


def sampling_of_last_iteration(root: str) -> tuple[int, int]:
    """(iterations, HEALPix order of the last iteration) from the run's sampling.star files."""
    its = sorted(glob.glob(f"{root}_it[0-9][0-9][0-9]_sampling.star"))
    n = int(re.search(r"_it(\d{3})_", its[-1]).group(1)) if its else 0
    last = its[-1] if its else None
    if Path(f"{root}_sampling.star").exists():  # RELION's final iteration, written without a number
        n, last = n + 1, f"{root}_sampling.star"
    from cryorefine.io.star import read_star

    general = read_star(last)["sampling_general"] if last else None
    return n, int(general["rlnHealpixOrder"].iloc[0]) if general is not None else -1


def judge(root: str, truth_dir: Path, truth_star: Path, sym: str = "C1") -> dict:
    final = Path(f"{root}_half1_class001_unfil.mrc").exists() and Path(f"{root}_data.star").exists()
    if final:
        h1, h2, data, label = (
            f"{root}_half1_class001_unfil.mrc",
            f"{root}_half2_class001_unfil.mrc",
            f"{root}_data.star",
            "final",
        )
    else:
        its = sorted(glob.glob(f"{root}_it[0-9][0-9][0-9]_half1_class001.mrc"))
        last = re.search(r"_it(\d{3})_", its[-1]).group(1)
        h1, h2 = f"{root}_it{last}_half1_class001.mrc", f"{root}_it{last}_half2_class001.mrc"
        data, label = f"{root}_it{last}_data.star", f"iteration {int(last)} (not converged; τ²-filtered half maps)"
    m1, angpix = read_map(h1)
    m2, _ = read_map(h2)
    truth, _ = read_map(truth_dir / "truth.mrc")
    t1, t2, tt = (torch.from_numpy(x).double() for x in (m1, m2, truth))
    fsc_h = fsc_curve(t1, t2)
    box = m1.shape[0]
    fsc_t = fsc_curve((t1 + t2) / 2, tt)
    predicted = torch.sqrt((2 * fsc_h.clamp(min=0)) / (1 + fsc_h.clamp(min=0)))
    errs = summarise_pose_errors(pose_errors(read_poses(data), read_poses(truth_star), sym))
    iterations, order = sampling_of_last_iteration(root)
    return {
        "state": label,
        "half_maps": [h1, h2],
        "data": data,
        "iterations": iterations,
        "last_healpix_order": order,
        "last_fine_angular_step_deg": 60.0 / 2**order / 2 if order >= 0 else float("nan"),
        "gold_standard_0.143_angst": resolution_angstrom(fsc_h, 0.143, box, angpix),
        "gold_standard_shell": int(round(box * angpix / resolution_angstrom(fsc_h, 0.143, box, angpix))),
        "fsc_to_truth_0.5_angst": resolution_angstrom(fsc_t, 0.5, box, angpix),
        "halves_independence_max_abs_diff": float((predicted[1:] - fsc_t[1:]).abs().max()),
        "halves_independence_mean_abs_diff": float((predicted[1:] - fsc_t[1:]).abs().mean()),
        **errs,
        "fsc_halves": [round(float(x), 4) for x in fsc_h],
        "fsc_truth": [round(float(x), 4) for x in fsc_t],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("truth_dir"), ap.add_argument("ours"), ap.add_argument("relion"), ap.add_argument("out")
    ap.add_argument("--ours_label", default="cryorefine"), ap.add_argument("--relion_label", default="RELION 3.1.3")
    ap.add_argument("--ours_wall", default=""), ap.add_argument("--relion_wall", default="")
    ap.add_argument("--truth_star", default=None, help="STAR with the true poses (default TRUTH_DIR/particles.star)")
    ap.add_argument("--sym", default="C1", help="point group: pose errors modulo its operators")
    a = ap.parse_args()
    td = Path(a.truth_dir)
    ts = Path(a.truth_star) if a.truth_star else td / "particles.star"
    res = {"ours": judge(a.ours, td, ts, a.sym), "relion": judge(a.relion, td, ts, a.sym)}
    res["ours"]["label"], res["relion"]["label"] = a.ours_label, a.relion_label
    res["ours"]["wall"], res["relion"]["wall"] = a.ours_wall, a.relion_wall
    try:
        res["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        res["commit"] = ""
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))
    rows = [
        "state",
        "gold_standard_0.143_angst",
        "gold_standard_shell",
        "fsc_to_truth_0.5_angst",
        "angle_median_deg",
        "angle_p90_deg",
        "shift_median_angst",
        "iterations",
        "last_healpix_order",
        "last_fine_angular_step_deg",
        "halves_independence_mean_abs_diff",
        "wall",
    ]
    md = [f"| | {res['ours']['label']} | {res['relion']['label']} |", "|---|---|---|"]
    for r in rows:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        md.append(f"| {r} | {fmt(res['ours'][r])} | {fmt(res['relion'][r])} |")
    Path(a.out + ".table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
