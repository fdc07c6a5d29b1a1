"""Run-to-run scatter of the fidelity comparison on one set: several seeds of ours and of RELION 3.1.3, each of ours
judged against each of RELION's runs with fidelity_report's criteria.

usage: python bench/fidelity_seeds.py SETDIR --ours LABEL=JSON [--ours ...] --relion LABEL=DIR [--relion ...] --o PREFIX
JSON: fidelity_ours.py's judgement of one of our runs (or fidelity_report.py's JSON, whose "ours" it takes);
DIR: a RELION output folder of bench/relion_fidelity.sh SETDIR SEED (run_* inside), judged here with
compare_refine.judge, or fidelity_report.py's JSON of an earlier run (its "relion"). Writes PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_refine import judge  # noqa: E402
from fidelity_report import criteria  # noqa: E402

COLUMNS = (
    ("gold-standard (Å)", "gold_standard_0.143_angst", "{:.2f}"),
    ("FSC-to-truth 0.5 (Å)", "fsc_to_truth_0.5_angst", "{:.2f}"),
    ("median angle (°)", "angle_median_deg", "{:.3f}"),
    ("iterations", "iterations", "{}"),
    ("last order", "last_healpix_order", "{}"),
)
CRITERIA = ("gold_standard_ok", "fsc_to_truth_ok", "angle_ok", "iterations_ok", "last_step_ok")


def labelled(pairs: list[str]) -> dict[str, Path]:
    return {p.split("=", 1)[0]: Path(p.split("=", 1)[1]) for p in pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setdir", type=Path)
    ap.add_argument("--ours", action="append", required=True)
    ap.add_argument("--relion", action="append", required=True)
    ap.add_argument("--o", required=True)
    a = ap.parse_args()
    meta = json.loads((a.setdir / "set.json").read_text())
    ours = {}
    for label, path in labelled(a.ours).items():
        d = json.loads(path.read_text())
        ours[label] = d.get("ours", d) | {"angpix": meta["angpix"]}
    relion = {
        label: json.loads(d.read_text())["relion"]
        if d.suffix == ".json"
        else judge(str(d / "run"), a.setdir, a.setdir / "particles_truth.star", meta["sym"])
        for label, d in labelled(a.relion).items()
    }
    judged = {f"{o} vs {r}": criteria(ours[o], relion[r], meta["box"]) for o in ours for r in relion}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    md = [
        f"# Run-to-run scatter on the held-out set `{meta['name']}`",
        "",
        f"`python bench/fidelity_seeds.py {' '.join(sys.argv[1:])}` at {commit}. Seeds are --random_seed of both "
        "programs (the same particles, start, half sets and flags otherwise; bench/relion_fidelity.sh SETDIR SEED, "
        "bench/fidelity_device.sh with SEED=N).",
        "",
        "| run | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, runs in (("cryorefine", ours), ("RELION 3.1.3", relion)):
        for label, r in runs.items():
            md.append(f"| {name} {label} | " + " | ".join(f.format(r[k]) for _, k, f in COLUMNS) + " |")
    md += ["", "| ours vs RELION | " + " | ".join(CRITERIA) + " |", "|---|" + "---|" * len(CRITERIA)]
    md += [f"| {pair} | " + " | ".join("yes" if c[k] else "no" for k in CRITERIA) + " |" for pair, c in judged.items()]
    Path(a.o + ".md").write_text("\n".join(md) + "\n")
    Path(a.o + ".json").write_text(
        json.dumps({"set": meta, "ours": ours, "relion": relion, "criteria": judged, "commit": commit}, indent=1)
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
