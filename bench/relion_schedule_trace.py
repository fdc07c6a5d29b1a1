"""The schedule of a RELION auto-refine run, iteration by iteration, as a small JSON: what RELION measured (resolution,
half-set FSC, mean pmax, pose changes, expected accuracies) and what it decided (window, HEALPix order, offsets,
incr_size, the high-FSC flag, its counters, convergence). tests/refine/test_schedule_replay.py replays the measurements
through our Schedule and checks every decision.

usage: python bench/relion_schedule_trace.py RELION_DIR OUT.json [--root run]
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path

from cryorefine.io.star import read_star


def _general(path: Path, block: str) -> dict:
    df = read_star(path)[block]
    return {k: df[k].iloc[0] for k in df.columns}


def trace(relion_dir: Path, root: str = "run") -> dict:
    its = sorted(
        int(re.search(r"_it(\d{3})_optimiser", p).group(1))
        for p in glob.glob(str(relion_dir / f"{root}_it[0-9][0-9][0-9]_optimiser.star"))
    )
    first = _general(relion_dir / f"{root}_it000_half1_model.star", "model_general")
    out = {"box": int(first["rlnOriginalImageSize"]), "angpix": float(first["rlnPixelSize"]), "iterations": []}
    for k in its:
        if k == 0:
            continue
        pre = relion_dir / f"{root}_it{k:03d}"
        blocks = read_star(f"{pre}_half1_model.star")
        general = {c: blocks["model_general"][c].iloc[0] for c in blocks["model_general"].columns}
        classes = blocks["model_classes"]
        opt = _general(Path(f"{pre}_optimiser.star"), "optimiser_general")
        sampling = _general(Path(f"{pre}_sampling.star"), "sampling_general")
        out["iterations"].append(
            {
                "iteration": k,
                "resolution_angst": float(general["rlnCurrentResolution"]),
                "current_size": int(general["rlnCurrentImageSize"]),
                "ave_pmax": float(general["rlnAveragePmax"]),
                "fsc": [round(float(x), 6) for x in blocks["model_class_1"]["rlnGoldStandardFsc"]],
                "accuracy_rotation_deg": float(classes["rlnAccuracyRotations"].iloc[0]),
                "accuracy_translation_angst": float(classes["rlnAccuracyTranslationsAngst"].iloc[0]),
                "changes_orientation_deg": float(opt["rlnChangesOptimalOrientations"]),
                "changes_offset_angst": float(opt["rlnChangesOptimalOffsets"]),
                "changes_classes": float(opt["rlnChangesOptimalClasses"]),
                "incr_size": int(opt["rlnIncrementImageSize"]),
                "has_high_fsc_at_limit": int(opt.get("rlnHasHighFscAtResolLimit", -1)),
                "iter_without_resolution_gain": int(opt["rlnNumberOfIterWithoutResolutionGain"]),
                "iter_without_large_changes": int(opt["rlnNumberOfIterWithoutChangingAssignments"]),
                "healpix_order": int(sampling["rlnHealpixOrder"]),
                "offset_range_angst": float(sampling["rlnOffsetRange"]),
                "offset_step_angst": float(sampling["rlnOffsetStep"]),
                "local": int(general.get("rlnOrientationalPriorMode", 0)) > 0,
            }
        )
    final = relion_dir / f"{root}_model.star"
    out["converged_after"] = its[-1] if final.exists() else None  # RELION's final (joined) iteration has no number
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("relion_dir"), ap.add_argument("out"), ap.add_argument("--root", default="run")
    a = ap.parse_args()
    t = trace(Path(a.relion_dir), a.root)
    Path(a.out).write_text(json.dumps(t, indent=1) + "\n")
    print(f"{len(t['iterations'])} iterations; converged after {t['converged_after']}")


if __name__ == "__main__":
    main()
