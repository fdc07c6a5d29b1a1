"""report.html: self-contained, has every section, renders in a headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cryorefine.refine.steps import central_slices
from cryorefine.report import write_report

BOX, ANGPIX = 64, 1.5


def _inputs(n_iter=3, n_part=2000, classes=False, seed=0):
    rng = np.random.default_rng(seed)
    history = []
    for i in range(1, n_iter + 1):
        stages = {
            "getFourierTransformsAndCTFs": 1.0 + 0.1 * i,
            "getAllSquaredDifferences": 6.0 / i,
            "convertAllDiff2ToWeights": 0.5,
            "storeWeightedSums": 2.0,
            "M-step": 1.5,
        }
        rec = {
            "iteration": i,
            "resolution_angst": 12.0 / i**0.5,
            "healpix_order": 2 + i // 2,
            "local": i >= 3,
            "window_shell": 10 + 3 * i,
            "coarse_shell": 8 + 2 * i,
            "change_orientation_deg": 8.0 / i,
            "change_offset_px": 1.5 / i,
            "mean_significant": 200.0 / i,
            "mean_max_prob": 0.1 * i,
            "sigma_offset_angst": 3.0,
            "seconds": sum(stages.values()) + 0.3,
            "stages": stages,
            "final": i == n_iter,
            "note": None if i == n_iter else f"healpix order -> {3 + i // 2} <&>",
        }
        if classes:
            p = rng.dirichlet(np.ones(3))
            rec["class_distribution"] = list(map(float, p))
        history.append(rec)
    s = np.arange(BOX // 2 + 1)
    fsc = 1.0 / (1.0 + np.exp((s - 18.0) / 2.0))
    fsc[0] = 1.0
    poses = SimpleNamespace(
        rot_deg=rng.uniform(-180, 180, n_part),
        tilt_deg=np.degrees(np.arccos(rng.uniform(-1, 1, n_part))),
        psi_deg=rng.uniform(-180, 180, n_part),
        origin_x_angst=rng.normal(0, 2, n_part),
        origin_y_angst=rng.normal(0, 2, n_part),
        class_number=rng.integers(1, 4 if classes else 2, n_part),
        max_prob=rng.uniform(0, 1, n_part),
        n_significant=rng.integers(1, 300, n_part),
    )
    z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
    volume = np.exp(-(x**2 + y**2 + z**2) / (2 * 8.0**2)) + 0.5 * np.exp(
        -((x - 10) ** 2 + y**2 + (z + 5) ** 2) / (2 * 4.0**2)
    )
    return history, fsc, poses, volume.astype(np.float32)


def _write(tmp_path, **kw):
    history, fsc, poses, volume = _inputs(**kw)
    write_report(tmp_path, str(tmp_path / "run"), history, fsc, BOX, ANGPIX, poses, central_slices(volume))
    return tmp_path / "report.html"


def test_report_is_self_contained_and_complete(tmp_path):
    t0 = time.perf_counter()
    path = _write(tmp_path)
    elapsed = time.perf_counter() - t0
    assert path.is_file()
    assert not list(tmp_path.glob(".report*")), "temporary file left behind"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert str(tmp_path / "run") in text
    # self-contained: no remote or relative references of any kind
    assert 'src="http' not in text and "href=" not in text and "<script" not in text and "<link" not in text
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) >= 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(re.findall(r"<img\b", text)) == len(srcs)
    assert 'class="err"' not in text, "a plot failed to draw"
    headings = " | ".join(re.findall(r"<h2>(.*?)</h2>", text))
    for section in ("Resolution", "Pose changes", "angular distribution", "Time per iteration", "Map", "Iterations"):
        assert section in headings
    for caption in (
        "FSC",
        "Resolution per iteration",
        "Pose changes",
        "Angular distribution",
        "Time per stage",
        "Central slices",
    ):
        assert f"<figcaption>{caption}" in text or f"<figcaption>Half-map {caption}" in text
    assert "Class distribution" not in text  # refinement: no classes
    # iteration table: one row per iteration, note escaped
    assert text.count("<tr") == 1 + 3
    assert "&lt;&amp;&gt;" in text and "<&>" not in text
    assert "final iteration" in text
    assert elapsed < 10  # < 2 s on an idle machine; generous for loaded CI


def test_report_classification_and_empty_fsc(tmp_path):
    history, fsc, poses, volume = _inputs(classes=True, n_part=300)
    write_report(tmp_path, "out/class", history, np.zeros_like(fsc), BOX, ANGPIX, poses, central_slices(volume))
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Class distribution and time per iteration</h2>" in text
    assert "<figcaption>Class distribution per iteration</figcaption>" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) >= 7
    assert 'class="err"' not in text
    # overwritten in place on the next iteration
    write_report(tmp_path, "out/class", history[:1], fsc, BOX, ANGPIX, poses, central_slices(volume))
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count("<tr") == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium for a headless render")
def test_report_renders_in_chromium(tmp_path):
    path = _write(tmp_path)
    png = tmp_path / "shot.png"
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1280,4000",
        path.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert png.is_file()
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_a_page_from_figures_drawn_apart_is_the_report_drawn_whole(tmp_path):
    """The last report's split (one job per figure, the page written by the run's process) leaves out no figure and
    changes none."""
    from cryorefine.refine.report_refresh import report_parts

    history, fsc, poses, volume = _inputs(classes=True)
    pages = []
    for name in ("apart", "whole"):
        (tmp_path / name).mkdir()
        args = (tmp_path / name, "run", history, fsc, BOX, ANGPIX, poses, central_slices(volume))
        if name == "apart":
            jobs, write = report_parts(args)
            write([fn(*a) for fn, *a in reversed(jobs)][::-1])
        else:
            write_report(*args)
        text = (tmp_path / name / "report.html").read_text(encoding="utf-8")
        pages.append(re.sub(r"Generated <b>[^<]*</b>", "", text))
    assert pages[0] == pages[1] and pages[0].count("<figure>") == 7
