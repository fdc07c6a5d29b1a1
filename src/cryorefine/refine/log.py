"""run.log: one line per iteration (resolution, pose changes, time per stage, batches per rank), also printed.

Under torchrun only rank 0 writes (``enabled``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        msg = f"[{stamp}] {text}"
        print(msg, file=sys.stderr, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")

    def iteration(self, r: dict) -> None:
        stages = " ".join(f"{k}={v:.1f}s" for k, v in r["stages"].items())
        host = ", ".join(f"{k} {v:.1f}s" for k, v in (r.get("host_s") or {}).items())
        stages += f"; host: {host}" if host else ""
        if r.get("allocator"):  # the GPU idles while the caching allocator calls the driver
            stages += "; GPU allocator: " + ", ".join(f"{k} {v}" for k, v in r["allocator"].items())
        if r.get("startup_s") is not None:  # this process's start to its first E-step batch
            stages += f"; first batch {r['startup_s']:.1f}s after the process started"
        mode = "local" if r["local"] else "global"
        extra = ""
        if "class_distribution" in r:
            extra = " classes=" + "/".join(f"{c:.2f}" for c in r["class_distribution"])
        if len(r.get("batches_per_rank", [])) > 1:
            extra += ", batches/rank " + "/".join(map(str, r["batches_per_rank"]))
            if r.get("estep_s_per_rank"):
                extra += ", E-step s/rank " + "/".join(f"{x:.2f}" for x in r["estep_s_per_rank"])
        self.line(
            f"iter {r['iteration']:3d}{' (final)' if r.get('final') else ''}: "
            f"resolution {r['resolution_angst']:.2f} Å, "
            f"hp{r['healpix_order']} {mode}, window {r['window_shell']} (coarse {r['coarse_shell']}) shells, "
            f"Δangle {r['change_orientation_deg']:.2f}°, Δoffset {r['change_offset_px']:.2f} px, "
            f"nsig {r['mean_significant']:.1f}, pmax {r['mean_max_prob']:.3f}, "
            f"accuracy {r.get('accuracy_rotation_deg', 0):.2f}°{extra}, {r['seconds']:.1f} s [{stages}]"
            + (f"; {r['memory']}" if r.get("memory") else "")
            + (f" — {r['note']}" if r.get("note") else "")
        )
