"""Per-iteration wall times of one auto-refine on the CPU beside RELION 3.1.3's on the same set (issue 23's CPU path):
ours from run.log, RELION's from the times its run_itNNN_optimiser.star files were written (each is written at the
end of its iteration; it000 after the initial noise estimate), its last iteration up to the end in time.txt.

usage: python bench/cpu_vs_relion_times.py RELION_DIR OUR_RUN_DIR OUT_PREFIX [--local_order 3]
RELION_DIR holds run_it*_optimiser.star, run_it*_sampling.star and bench/relion_fidelity.sh's time.txt; OUR_RUN_DIR
holds run.log. A RELION iteration counts as a local search from --local_order (its --auto_local_healpix_order) on.
Writes OUT_PREFIX.md and OUT_PREFIX.json with the machine, date, commit and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def relion_iterations(root: Path, local_order: int) -> tuple[list[dict], float]:
    """[{iteration, seconds, local}] and the whole run's wall seconds (time.txt)."""
    stamps = sorted(root.glob("run_it[0-9][0-9][0-9]_optimiser.star"))
    times = [os.path.getmtime(p) for p in stamps]
    meta = dict(line.split(" ", 1) for line in (root / "time.txt").read_text().splitlines() if " " in line)
    end = datetime.fromisoformat(meta["end"].strip()).timestamp()
    out = []
    for k in range(1, len(stamps)):
        sampling = (root / stamps[k].name.replace("optimiser", "sampling")).read_text()
        order = int(re.search(r"_rlnHealpixOrder\s+(\d+)", sampling).group(1))
        out.append({"iteration": k, "seconds": round(times[k] - times[k - 1], 1), "local": order >= local_order})
    # the final iteration (no number) runs from the last numbered one's end to the end of the run
    out.append({"iteration": len(stamps), "seconds": round(end - times[-1], 1), "local": True, "final": True})
    return out, float(meta["wall_s"])


def our_iterations(run_dir: Path) -> tuple[list[dict], float]:
    """[{iteration, seconds, local}] from run.log, and the run's seconds (its 'finished' line)."""
    log = (run_dir / "run.log").read_text()
    its = [
        {"iteration": int(m.group(1)), "seconds": float(m.group(3)), "local": m.group(2) == "local"}
        for m in re.finditer(r"iter +(\d+)[^:]*:.*? hp\d+ (global|local),.*?, ([\d.]+) s \[", log)
    ]
    total = json.loads(re.search(r"finished: (\{.*\})", log).group(1))["seconds"]
    return its, float(total)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("relion_dir")
    ap.add_argument("our_run_dir")
    ap.add_argument("out_prefix")
    ap.add_argument("--local_order", type=int, default=3)
    a = ap.parse_args()
    relion, relion_total = relion_iterations(Path(a.relion_dir), a.local_order)
    ours, ours_total = our_iterations(Path(a.our_run_dir))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python", *sys.argv]),
        "relion": {"iterations": relion, "wall_s": relion_total},
        "ours": {"iterations": ours, "wall_s": ours_total},
        "ratio": round(ours_total / relion_total, 3),
    }
    sums = {}
    for name, its in (("ours", ours), ("relion", relion)):
        loc = [i["seconds"] for i in its if i["local"]]
        glob = [i["seconds"] for i in its if not i["local"]]
        sums[name] = {"global_s": round(sum(glob), 1), "local_s": round(sum(loc), 1), "local_n": len(loc)}
    res["by_search"] = sums
    Path(a.out_prefix + ".json").write_text(json.dumps(res, indent=1))
    lines = [
        f"# CPU auto-refine beside RELION 3.1.3 ({res['date']}, {res['machine']}, commit {commit})",
        "",
        f"`{res['command']}`",
        "",
        f"Whole runs: ours {ours_total:.0f} s, RELION {relion_total:.0f} s (ratio {res['ratio']}).",
        f"Global searches: ours {sums['ours']['global_s']} s, RELION {sums['relion']['global_s']} s.",
        f"Local searches: ours {sums['ours']['local_s']} s in {sums['ours']['local_n']} iterations, "
        f"RELION {sums['relion']['local_s']} s in {sums['relion']['local_n']}.",
        "",
        "| iteration | ours s | search | RELION s | search |",
        "|---|---|---|---|---|",
    ]
    for k in range(max(len(ours), len(relion))):
        o = ours[k] if k < len(ours) else None
        r = relion[k] if k < len(relion) else None
        cell = lambda x: ("", "") if x is None else (x["seconds"], "local" if x["local"] else "global")  # noqa: E731
        lines.append(f"| {k + 1} | {cell(o)[0]} | {cell(o)[1]} | {cell(r)[0]} | {cell(r)[1]} |")
    Path(a.out_prefix + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
