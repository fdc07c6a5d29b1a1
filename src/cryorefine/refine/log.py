"""run.log: one line per iteration (resolution, pose changes, time per stage), also printed."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, path):
        self.path = Path(path)

    def line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        msg = f"[{stamp}] {text}"
        print(msg, file=sys.stderr, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")

    def iteration(self, r: dict) -> None:
        stages = " ".join(f"{k}={v:.1f}s" for k, v in r["stages"].items())
        mode = "local" if r["local"] else "global"
        classes = ""
        if "class_distribution" in r:
            classes = " classes=" + "/".join(f"{c:.2f}" for c in r["class_distribution"])
        self.line(
            f"iter {r['iteration']:3d}{' (final)' if r.get('final') else ''}: resolution {r['resolution_angst']:.2f} Å, "
            f"hp{r['healpix_order']} {mode}, window {r['window_shell']} (coarse {r['coarse_shell']}) shells, "
            f"Δangle {r['change_orientation_deg']:.2f}°, Δoffset {r['change_offset_px']:.2f} px, "
            f"nsig {r['mean_significant']:.1f}, pmax {r['mean_max_prob']:.3f}, accuracy {r.get('accuracy_rotation_deg', 0):.2f}°{classes}, {r['seconds']:.1f} s [{stages}]"
            + (f" — {r['note']}" if r.get("note") else "")
        )
