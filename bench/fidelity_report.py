"""The fidelity comparison of one set, written up: RELION 3.1.3's run judged here (bench/compare_refine.py's judge: one
FSC tool on the unfiltered halves and against the truth, pose errors modulo the point group), ours as judged where it
ran (bench/fidelity_ours.py's JSON), the issue's criteria, and bench/trajectory.py's side-by-side table.

usage: python bench/fidelity_report.py SETDIR OURS_DIR OUT_PREFIX
SETDIR: a set of bench/fidelity_sets.py with RELION's run in SETDIR/relion; OURS_DIR: our run's STAR files and
<set>-<label>.json (unpacked from fidelity_device.sh's tarball). Writes OUT_PREFIX.md and OUT_PREFIX.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_refine import judge  # noqa: E402
from trajectory import main as trajectory_main  # noqa: E402


def criteria(ours: dict, relion: dict, box: int) -> dict:
    """The issue's bars: gold-standard and FSC-to-truth in the same Fourier shell or finer, median angular error at most
    RELION's + 3 %, iterations at most RELION's + 20 %, a last angular step as fine as RELION's."""
    shell = lambda angst, apix: round(box * apix / angst)  # noqa: E731
    apix = ours["angpix"]
    return {
        "gold_standard_shell_ours_vs_relion": [
            shell(ours["gold_standard_0.143_angst"], apix),
            shell(relion["gold_standard_0.143_angst"], apix),
        ],
        "fsc_to_truth_shell_ours_vs_relion": [
            shell(ours["fsc_to_truth_0.5_angst"], apix),
            shell(relion["fsc_to_truth_0.5_angst"], apix),
        ],
        "gold_standard_ok": shell(ours["gold_standard_0.143_angst"], apix)
        >= shell(relion["gold_standard_0.143_angst"], apix),
        "fsc_to_truth_ok": shell(ours["fsc_to_truth_0.5_angst"], apix) >= shell(relion["fsc_to_truth_0.5_angst"], apix),
        "angle_ok": ours["angle_median_deg"] <= 1.03 * relion["angle_median_deg"],
        "iterations_ok": ours["iterations"] <= 1.2 * relion["iterations"],
        "last_step_ok": ours["last_healpix_order"] >= relion["last_healpix_order"],
    }


def main():
    setdir, ours_dir, prefix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    meta = json.loads((setdir / "set.json").read_text())
    ours = json.loads(next(ours_dir.glob(f"{meta['name']}-*.json")).read_text())
    ours["angpix"] = meta["angpix"]
    relion = judge(str(setdir / "relion" / "run"), setdir, setdir / "particles_truth.star", meta["sym"])
    wall = (setdir / "relion" / "time.txt").read_text().split()[1] if (setdir / "relion" / "time.txt").exists() else "?"
    res = {
        "set": meta,
        "ours": ours,
        "relion": relion,
        "relion_wall_s": wall,
        "criteria": criteria(ours, relion, meta["box"]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    Path(prefix + ".json").write_text(json.dumps(res, indent=1, default=str))
    rows = [
        ("gold-standard FSC 0.143 of the unfiltered halves (Å)", "gold_standard_0.143_angst"),
        ("final map vs truth, FSC 0.5 (Å)", "fsc_to_truth_0.5_angst"),
        ("median angular error (°)", "angle_median_deg"),
        ("90th percentile angular error (°)", "angle_p90_deg"),
        ("median shift error (Å)", "shift_median_angst"),
        ("iterations", "iterations"),
        ("last HEALPix order", "last_healpix_order"),
        ("last fine angular step (°)", "last_fine_angular_step_deg"),
    ]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    md = [
        f"# Fidelity: cryorefine beside RELION 3.1.3 on the held-out set `{meta['name']}`",
        "",
        f"Set (bench/fidelity_sets.py): box {meta['box']}, {meta['angpix']} Å/px, {meta['n']} particles, "
        f"SNR {meta['snr']}, {meta['sym']}, --ini_high {meta['ini_high']}, "
        f"--particle_diameter {meta['particle_diameter']}; both programs start from "
        "particles.star without poses, the same start map, half sets and flags (bench/relion_fidelity.sh).",
        "",
        f"Ours: {ours.get('device', '?')}, {ours.get('wall_s', '?')} s (report written at {res['commit']}; "
        "the commit ours ran at is in the run notes or that day's bench/results/<date>-device-runs.md) "
        f"({' '.join(map(str, ours.get('argv', [])))}). "
        f"RELION 3.1.3: `mpirun -n 3 relion_refine_mpi` on this 2-core CPU, {wall} s (what else ran beside it: "
        "the run notes).",
        "",
        "| | cryorefine | RELION 3.1.3 |",
        "|---|---|---|",
    ]
    md += [f"| {label} | {fmt(ours.get(key))} | {fmt(relion.get(key))} |" for label, key in rows]
    md += ["", "Criteria: " + ", ".join(f"{k} {v}" for k, v in res["criteria"].items()), ""]
    Path(prefix + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    trajectory_main(
        [
            str(ours_dir),
            str(setdir / "relion"),
            "--input",
            str(setdir / "particles.star"),
            "--o",
            prefix + "-trajectory.md",
            "--json",
            prefix + "-trajectory.json",
        ]
    )


if __name__ == "__main__":
    main()
