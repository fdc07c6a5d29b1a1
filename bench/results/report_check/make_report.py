"""Render report.html for realistic synthetic refinement data and screenshot it with headless Chromium.

Run: /work/venv/bin/python bench/results/report_check/make_report.py
Writes report_example.html and report_screenshot.png next to this script.
"""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cryorefine.refine.steps import central_slices
from cryorefine.report import write_report

HERE = Path(__file__).resolve().parent
BOX, ANGPIX, N = 96, 1.3, 4000
rng = np.random.default_rng(1)

# 12 iterations of an auto-refine: global hp2 -> hp3 -> hp4 local, resolution improving, then final
history, res = [], 14.0
orders = [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
for i in range(1, 13):
    res = max(3.4, res * rng.uniform(0.8, 0.95)) if i > 1 else res
    order, local = orders[i - 1], i >= 7
    stages = {
        "getFourierTransformsAndCTFs": rng.uniform(2, 3),
        "getAllSquaredDifferences": (40 if not local else 12) * 2 ** (order - 2) / (1 + i / 6),
        "convertAllDiff2ToWeights": rng.uniform(1, 2),
        "storeWeightedSums": rng.uniform(5, 8),
        "M-step": rng.uniform(3, 5),
    }
    final = i == 12
    note = None
    if i in (3, 6, 9):
        note = f"resolution and pose changes stalled: healpix order {order} -> {order + 1}" + (
            "; switching to local searches" if i == 6 else ""
        )
    elif i == 11:
        note = "converged: no further improvement; next iteration is the final one with all data"
    history.append(
        {
            "iteration": i,
            "resolution_angst": res,
            "healpix_order": order,
            "local": local,
            "window_shell": int(BOX * ANGPIX / res) + 6,
            "coarse_shell": int(BOX * ANGPIX / res),
            "change_orientation_deg": 25 * np.exp(-i / 2.5) + rng.uniform(0.2, 0.6),
            "change_offset_px": 2.5 * np.exp(-i / 3) + rng.uniform(0.05, 0.2),
            "mean_significant": 800 * np.exp(-i / 2.5) + 3,
            "mean_max_prob": min(0.95, 0.05 + 0.08 * i),
            "sigma_offset_angst": 3.0 * np.exp(-i / 8) + 0.8,
            "seconds": sum(stages.values()) + rng.uniform(1, 3),
            "stages": stages,
            "final": final,
            "note": note,
        }
    )

s = np.arange(BOX // 2 + 1)
s143 = BOX * ANGPIX / res
fsc = 1.0 / (1.0 + np.exp((s - s143 + 1.79 * 1.5) / 1.5)) + rng.normal(0, 0.015, s.size) * (s > s143 + 2)
fsc[0] = 1.0

# preferred orientations: a top view cluster + a side-view band
n_top = N // 4
rot = np.concatenate([rng.normal(30, 20, n_top), rng.uniform(-180, 180, N - n_top)])
tilt = np.concatenate([np.abs(rng.normal(0, 12, n_top)), np.clip(rng.normal(90, 25, N - n_top), 0, 180)])
poses = SimpleNamespace(
    rot_deg=(rot + 180) % 360 - 180,
    tilt_deg=tilt,
    psi_deg=rng.uniform(-180, 180, N),
    origin_x_angst=rng.normal(0, 1.5, N),
    origin_y_angst=rng.normal(0, 1.5, N),
    class_number=np.ones(N, int),
    max_prob=rng.beta(5, 2, N),
    n_significant=rng.integers(1, 20, N),
)

# a protein-like map: 300 atoms-ish blobs inside a 30 px radius, low-pass by Gaussian width 1.6 px
z, y, x = (np.mgrid[:BOX, :BOX, :BOX] - BOX // 2).astype(np.float32)
vol = np.zeros((BOX, BOX, BOX), np.float32)
centres = rng.normal(0, 1, (300, 3))
centres *= (rng.uniform(0, 1, (300, 1)) ** (1 / 3) * 28) / np.linalg.norm(centres, axis=1, keepdims=True)
for cz, cy, cx in centres:
    sl = tuple(slice(max(0, int(c) + BOX // 2 - 6), min(BOX, int(c) + BOX // 2 + 7)) for c in (cz, cy, cx))
    vol[sl] += np.exp(-((z[sl] - cz) ** 2 + (y[sl] - cy) ** 2 + (x[sl] - cx) ** 2) / (2 * 1.6**2))
vol += rng.normal(0, 0.03, vol.shape).astype(np.float32)

t0 = time.perf_counter()
write_report(HERE, "out/run", history, fsc, BOX, ANGPIX, poses, central_slices(vol))
print(f"write_report: {time.perf_counter() - t0:.2f} s")
(HERE / "report.html").replace(HERE / "report_example.html")

if shutil.which("chromium"):
    with tempfile.TemporaryDirectory() as prof:
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={prof}",
                f"--screenshot={HERE / 'report_screenshot.png'}",
                "--window-size=1280,4000",
                (HERE / "report_example.html").as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print("screenshot:", (HERE / "report_screenshot.png").stat().st_size, "bytes")
