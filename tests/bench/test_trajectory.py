"""bench/trajectory.py on a real tiny cryorefine run (box 32, 60 particles, 3 iterations) against hand-written
RELION-3.1.3-shaped STAR files whose values are known: built from the cryorefine run's own files in RELION's units and
conventions, so that the runs never part (negative control), or changed at iteration 3 so that they part there. The
RELION run is "still going": iteration 4 has its sampling and data.star, an empty model.star, no run_model.star.

Checked: parsing of both layouts, σ²/τ² in RELION's units on both sides (ratios 1, not 32⁴; older runs of ours
divided by box⁴), RELION's pose-change definitions (a psi step of 6° is a 4° Euler-axes distance; an x step of 3 Å is
3/√2 Å per axis), half-1 accuracies, means over the half sets, the parting rule and its tolerances, runs of different
lengths and half-written files.
"""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryorefine.cli.main import main as cli
from cryorefine.io.star import read_star, write_star_table
from small_set import small_set

REPO = Path(__file__).resolve().parents[2]
BOX, ANGPIX = 32, 6.0
PSI_STEP, X_STEP = 6.0, 3.0  # per iteration, in RELION's hand-written data.star files


def _load():
    spec = importlib.util.spec_from_file_location("trajectory", REPO / "bench" / "trajectory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tr = _load()


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    d = small_set(tmp_path_factory.mktemp("traj"), BOX, ANGPIX, 60, seed=5)
    rc = cli(
        [
            "refine",
            "--i",
            str(d / "particles.star"),
            "--o",
            str(d / "ours" / "run"),
            "--ref",
            str(d / "start.mrc"),
            "--ini_high",
            "30",
            "--particle_diameter",
            "170",
            "--ctf",
            "--flatten_solvent",
            "--healpix_order",
            "1",
            "--offset_range",
            "2",
            "--offset_step",
            "1",
            "--iter",
            "3",
            "--random_seed",
            "3",
            "--j",
            "1",
        ]
    )
    assert rc == 0
    return d


def _log(d: Path) -> dict:
    """What each iteration of ours used, from its run.log: {it: (healpix order, window shells)}."""
    text = (d / "ours" / "run.log").read_text()
    return {
        int(m[0]): (int(m[1]), int(m[2]))
        for m in re.findall(r"iter\s+(\d+)(?: \(final\))?: resolution [\d.]+ Å, hp(\d+) \w+, window (\d+)", text)
    }


def write_relion(d: Path, out: Path, tweak=None) -> Path:
    """RELION-shaped run_it000..003 files with ours' values in RELION's units and conventions (iteration N's files hold
    iteration N's sampling and window), and a still-running iteration 4 (sampling and data.star, an empty model.star).
    ``tweak(it, f)`` may change f["hp"], f["shell"] (resolution) or f["window"] before writing."""
    out.mkdir(parents=True)
    log = _log(d)
    offsets = {}  # HEALPix order -> ours' offset range/step (Å): they change only with the order
    for it in (3, 2, 1):
        g = read_star(d / "ours" / f"run_it{it:03d}_sampling.star")["sampling_general"].iloc[0]
        offsets[int(g["rlnHealpixOrder"])] = (float(g["rlnOffsetRange"]), float(g["rlnOffsetStep"]))
    offsets[log[1][0]] = (2 * ANGPIX, 1 * ANGPIX)  # --offset_range 2 --offset_step 1 (px) in iteration 1
    parts_in = read_star(d / "particles.star")
    optics, base = parts_in["optics"], parts_in["particles"]
    n_sh = BOX // 2 + 1
    shells = np.arange(n_sh)
    res = np.where(shells > 0, shells / (BOX * ANGPIX), 0.0)
    for it in range(5):
        f = {"hp": log[min(max(it, 1), 3)][0], "window": log[it][1] if it in log else 0}
        f["offsets"] = offsets[f["hp"]]
        model_o = read_star(d / "ours" / f"run_it{min(max(it, 1), 3):03d}_half1_model.star")
        g_o = model_o["model_general"].iloc[0]
        f["shell"] = BOX * ANGPIX / float(g_o["rlnCurrentResolution"]) if it >= 1 else None
        if tweak:
            tweak(it, f)
        write_star_table(
            out / f"run_it{it:03d}_sampling.star",
            {
                "sampling_general": {
                    "rlnIs3DSampling": 1,
                    "rlnIs3DTranslationalSampling": 0,
                    "rlnHealpixOrder": f["hp"],
                    "rlnSymmetryGroup": "C1",
                    "rlnTiltAngleLimit": -91.0,
                    "rlnPsiStep": 60.0 / 2 ** f["hp"],
                    "rlnOffsetRange": f["offsets"][0],
                    "rlnOffsetStep": f["offsets"][1],
                    "rlnHelicalOffsetStep": -1.0,
                    "rlnSamplingPerturbInstance": 0.1,
                    "rlnSamplingPerturbFactor": 0.5,
                },
                "sampling_directions": pd.DataFrame({"rlnAngleRot": [45.0, 135.0], "rlnAngleTilt": [90.0, 90.0]}),
            },
        )
        p = base.copy()
        p["rlnAnglePsi"] = (p["rlnAnglePsi"] + PSI_STEP * it + 180.0) % 360.0 - 180.0
        p["rlnOriginXAngst"] = p["rlnOriginXAngst"] + X_STEP * it
        if it >= 1:
            p["rlnGroupNumber"], p["rlnClassNumber"] = 1, 1
            p["rlnMaxValueProbDistribution"], p["rlnNrOfSignificantSamples"] = 0.25 * it, 10 * it
        write_star_table(out / f"run_it{it:03d}_data.star", {"optics": optics, "particles": p})
        if it == 4:  # iteration 4 still running: its model.star half written, no optimiser.star yet
            (out / "run_it004_half1_model.star").write_text("")
            continue
        cls_o = model_o["model_class_1"]
        for h in (1, 2):  # RELION: per-half σ², τ², σ_offset, ours' half h's (ours' model.star: RELION's units)
            model_h = read_star(d / "ours" / f"run_it{min(max(it, 1), 3):03d}_half{h}_model.star")
            general = {
                "rlnReferenceDimensionality": 3,
                "rlnDataDimensionality": 2,
                "rlnOriginalImageSize": BOX,
                "rlnCurrentResolution": BOX * ANGPIX / f["shell"] if it >= 1 else float("inf"),
                "rlnCurrentImageSize": 2 * f["window"],
                "rlnPaddingFactor": 2.0,
                "rlnPixelSize": ANGPIX,
                "rlnNrClasses": 1,
                "rlnNrBodies": 1,
                "rlnNrGroups": 1,
                "rlnTau2FudgeFactor": 1.0,
                "rlnSigmaOffsetsAngst": float(model_h["model_general"].iloc[0]["rlnSigmaOffsetsAngst"]),
                "rlnOrientationalPriorMode": 0,
                "rlnSigmaPriorRotAngle": 0.0,
                "rlnSigmaPriorTiltAngle": 0.0,
                "rlnSigmaPriorPsiAngle": 0.0,
            }
            classes = pd.DataFrame(
                {
                    "rlnReferenceImage": [f"run_it{it:03d}_half{h}_class001.mrc"],
                    "rlnClassDistribution": [1.0],
                    "rlnAccuracyRotations": [10.0 + it if h == 1 else 0.0],
                    "rlnAccuracyTranslationsAngst": [3.0 + it if h == 1 else 0.0],
                    "rlnEstimatedResolution": [general["rlnCurrentResolution"]],
                    "rlnOverallFourierCompleteness": [1.0],
                }
            )
            cls = pd.DataFrame(
                {
                    "rlnSpectralIndex": shells,
                    "rlnResolution": res,
                    "rlnAngstromResolution": np.where(res > 0, 1 / np.maximum(res, 1e-9), 999.0),
                    "rlnSsnrMap": cls_o["rlnSsnrMap"].to_numpy(),
                    "rlnGoldStandardFsc": cls_o["rlnGoldStandardFsc"].to_numpy(),
                    "rlnFourierCompleteness": np.ones(n_sh),
                    "rlnReferenceSigma2": np.full(n_sh, 1e-4),
                    "rlnReferenceTau2": model_h["model_class_1"]["rlnReferenceTau2"].to_numpy(),
                    "rlnSpectralOrientabilityContribution": np.zeros(n_sh),
                }
            )
            groups = pd.DataFrame(
                {
                    "rlnGroupNumber": [1],
                    "rlnGroupName": ["group"],
                    "rlnGroupNrParticles": [30],
                    "rlnGroupScaleCorrection": [1.0],
                }
            )
            sig = pd.DataFrame(
                {
                    "rlnSpectralIndex": shells,
                    "rlnResolution": res,
                    "rlnSigma2Noise": model_h["model_group_1"]["rlnSigma2Noise"].to_numpy(),
                }
            )
            blocks = {
                "model_general": general,
                "model_classes": classes,
                "model_class_1": cls,
                "model_groups": groups,
                "model_group_1": sig,
            }
            write_star_table(out / f"run_it{it:03d}_half{h}_model.star", blocks)
        write_star_table(
            out / f"run_it{it:03d}_optimiser.star",
            {
                "optimiser_general": {
                    "rlnOutputRootName": "run",
                    "rlnCurrentIteration": it,
                    "rlnDoAutoRefine": 1,
                    "rlnHasConverged": 0,
                    "rlnChangesOptimalOrientations": 999.0 if it == 0 else PSI_STEP * 2 / 3,
                    "rlnChangesOptimalOffsets": 999.0 if it == 0 else X_STEP / math.sqrt(2),
                }
            },
        )
    return out


def test_never_part_units_changes_lengths(ours, tmp_path, capsys):
    d = ours
    relion = write_relion(d, tmp_path / "relion")
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert tr.main([str(d / "ours"), str(relion), "--o", str(md), "--json", str(js)]) == 0
    assert "do not part" in capsys.readouterr().out
    r = json.loads(js.read_text())
    assert md.read_text().startswith("# Auto-refine trajectories") and "do not part" in md.read_text()
    assert (
        r["parted"] is None
        and r["common_iterations"] == [1, 2, 3]
        and r["box"] == BOX
        and r["sigma2_tau2_unit_factor"] == 1.0
    )
    rows = {row["iteration"]: row for row in r["iterations"]}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert (
        rows[0]["ours"] is None and rows[4]["ours"] is None and rows[4]["relion"]["resolution_angst"] is None
    )  # empty model.star
    assert rows[4]["relion"]["healpix_order"] == _log(d)[3][0] and rows[4]["relion"]["files"]["half1_model"] is False
    log = _log(d)
    n_sigma = n_tau = 0
    for it in (1, 2, 3):
        o, rel, sp = rows[it]["ours"], rows[it]["relion"], rows[it]["spectra"]
        assert (o["healpix_order"], o["window_shells"]) == log[it] == (rel["healpix_order"], rel["window_shells"])
        assert not o["local"] and not rel["local"] and rows[it]["differs"] == []
        assert {"HEALPix order", "local searches", "resolution shell", "window (shells)"} <= set(rows[it]["checked"])
        if (
            it >= 2
        ):  # (were ours to write iteration N's sampling into N-1's files, iteration 1's would be in a run_it000)
            assert (
                o["offset_step_angst"] == pytest.approx(rel["offset_step_angst"], abs=1e-5)
                and "offset step (Å)" in rows[it]["checked"]
            )
        # σ² and τ² in RELION's units on both sides (the half sets' mean)
        for s in sp["sigma2"]:
            if s["ratio"] is not None:
                n_sigma += 1
                assert s["ratio"] == pytest.approx(1.0, rel=1e-4), s
        for e in sp["at_fsc"]:
            if e["tau2_ratio"] is not None:
                n_tau += 1
                assert e["tau2_ratio"] == pytest.approx(1.0, rel=1e-4), e
            if e["shell"] is not None:
                assert e["fsc_ours"] == pytest.approx(e["fsc_relion"], abs=1e-5) and e["ssnr_ours"] == pytest.approx(
                    e["ssnr_relion"], rel=1e-4
                )
        # RELION's pose-change definitions: psi + 6° -> rows 1, 2 of the Euler matrix turn by 6°, row 3 not: 4°
        assert rel["change_orientation_deg"] == pytest.approx(PSI_STEP * 2 / 3, abs=1e-4)
        assert rel["change_offset_angst"] == pytest.approx(X_STEP / math.sqrt(2), abs=1e-4)
        assert rel["own_change_orientation_deg"] == pytest.approx(4.0) and rel[
            "own_change_offset_angst"
        ] == pytest.approx(X_STEP / math.sqrt(2), abs=1e-5)
        assert rel["accuracy_rotation_deg"] == pytest.approx(10.0 + it) and rel[
            "accuracy_translation_angst"
        ] == pytest.approx(3.0 + it)  # half 1's
        assert rel["sigma_offset_angst"] == pytest.approx(o["sigma_offset_angst"], abs=1e-4)
        assert rel["mean_max_prob"] == pytest.approx(0.25 * it) and rel["mean_significant"] == pytest.approx(10 * it)
        assert o["change_orientation_deg"] is not None and o["mean_max_prob"] is not None
        # ours' optimiser.star has RELION's change labels too, by RELION's definitions: the numbers computed here
        assert o["own_change_orientation_deg"] == pytest.approx(o["change_orientation_deg"], rel=1e-4)
        assert o["own_change_offset_angst"] == pytest.approx(o["change_offset_angst"], rel=1e-4, abs=1e-5)
    assert n_sigma >= 6 and n_tau >= 1
    assert "the other program's run_it000_data.star" in rows[1]["ours"]["change_against"]
    so, sr = r["summary"]["ours"], r["summary"]["relion"]
    assert (
        not sr["finished"]
        and sr["last_iteration"] == 4
        and sr["iterations_to_convergence"] is None
        and sr["final_resolution_angst"] is None
    )
    assert (
        so["finished"]
        and so["iterations_to_convergence"] == 3
        and so["final_resolution_angst"] > 0
        and so["final_healpix_order"] == log[3][0]
    )
    assert "not finished (4 iterations so far)" in md.read_text()
    assert sum("one noise group" in n for n in r["notes"]) == 2
    assert r["alignment"]["relion"]["shift"] == {"sampling": 0, "window": 0} and r["alignment"]["ours"][
        "log_iterations"
    ] == [1, 2, 3]


def test_part_at_iteration_3(ours, tmp_path):
    def hp(it, f):
        if it == 3:
            f["hp"] += 1

    r = tr.build(ours / "ours", write_relion(ours, tmp_path / "hp", hp))
    assert (
        r["parted"]["iteration"] == 3
        and len(r["parted"]["what"]) == 1
        and r["parted"]["what"][0].startswith("HEALPix order")
    )
    assert "**The runs part at iteration 3**: HEALPix order" in tr.markdown(r)

    def resolution(it, f):  # within the tolerances at 1 and 2, beyond them at 3
        if it == 1:
            f["window"] += 2
        if it == 2:
            f["shell"] += 1
        if it == 3:
            f["shell"] += 2

    r = tr.build(ours / "ours", write_relion(ours, tmp_path / "res", resolution))
    assert r["parted"]["iteration"] == 3 and [w.split(":")[0] for w in r["parted"]["what"]] == ["resolution shell"]


def test_older_runs_of_ours_in_unnormalised_units(ours, tmp_path):
    """A run of ours written before model.star held RELION's units (σ², τ² × box⁴; its sampling.star had
    rlnIsLocalSearch) is compared after dividing by box⁴: the same ratios of 1."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ours / "ours", old)
    for f in old.glob("run_it*_sampling.star"):
        f.write_text(f.read_text().replace("_rlnHealpixOrder", "_rlnIsLocalSearch\t0\n_rlnHealpixOrder"))
    for f in old.glob("run_it*_half?_model.star"):
        blocks = read_star(f)
        blocks["model_group_1"]["rlnSigma2Noise"] *= BOX**4
        blocks["model_class_1"]["rlnReferenceTau2"] *= BOX**4
        write_star_table(f, {k: v.iloc[0].to_dict() if k == "model_general" else v for k, v in blocks.items()})
    r = tr.build(old, write_relion(ours, tmp_path / "relion"))
    assert r["sigma2_tau2_unit_factor"] == BOX**4 and r["parted"] is None
    ratios = [s["ratio"] for row in r["iterations"] for s in row["spectra"].get("sigma2", []) if s["ratio"]]
    assert len(ratios) >= 6 and all(x == pytest.approx(1.0, rel=1e-4) for x in ratios)


def test_alignment_from_the_log():
    written = {1: {"window_shells": 20.0, "healpix_order": 2}, 2: {"window_shells": 18.0, "healpix_order": 3}}
    nxt = {
        1: {"window_shells": 16.0, "healpix_order": 2},
        2: {"window_shells": 20.0, "healpix_order": 2},
        3: {"window_shells": 18.0, "healpix_order": 3},
    }
    assert tr.detect_shift(written, nxt)[0] == 1
    assert tr.detect_shift(written, {1: written[1], 2: written[2]}, default=1)[0] == 0
    assert tr.detect_shift(written, {}, default=1)[0] == 1 and tr.detect_shift(written, {})[0] == 0
    used = tr.align(
        {
            1: {"window_shells": 20.0, "healpix_order": 2, "accuracy_rotation_deg": 5.0},
            2: {"window_shells": 18.0, "healpix_order": 3, "accuracy_rotation_deg": 4.0},
        },
        {"sampling": 1, "window": 0},
        {},
    )
    assert (
        used[1]["healpix_order"] is None and used[2]["healpix_order"] == 2 and used[2]["accuracy_rotation_deg"] == 5.0
    )  # with the sampling
    assert used[2]["window_shells"] == 18.0 and used[2]["as_written"]["healpix_order"] == 3
    used = tr.align(
        {1: {"window_shells": 20.0, "healpix_order": 2}},
        {"sampling": 1, "window": 1},
        {1: {"healpix_order": 2, "local": False, "window_shells": 16.0}},
    )
    assert (
        used[1]["window_shells"] == 16.0
        and used[1]["angular_step_deg"] == 15.0
        and used[1]["offset_step_angst"] is None
    )


def test_relion_final_iteration_without_itNNN_files(ours, tmp_path):
    """RELION 3.1.3 writes its final (joined) iteration only as run_{model,data,sampling}.star: one iteration more."""
    relion = write_relion(ours, tmp_path / "final")
    for f in relion.glob("run_it004_*"):
        f.unlink()
    blocks = read_star(relion / "run_it003_half1_model.star")
    general = blocks["model_general"].iloc[0].to_dict()
    general.update({"rlnCurrentResolution": 2 * ANGPIX, "rlnCurrentImageSize": BOX})
    write_star_table(relion / "run_model.star", {**blocks, "model_general": general})
    for kind in ("data", "sampling"):
        (relion / f"run_{kind}.star").write_text((relion / f"run_it003_{kind}.star").read_text())
    r = tr.build(ours / "ours", relion)
    s = r["summary"]["relion"]
    assert s["finished"] and s["iterations_to_convergence"] == 4 and s["final_iteration_without_itNNN_files"] == 4
    assert s["final_resolution_angst"] == pytest.approx(2 * ANGPIX)
    row = next(x for x in r["iterations"] if x["iteration"] == 4)
    assert row["relion"]["resolution_angst"] == pytest.approx(2 * ANGPIX) and row["relion"]["window_shells"] == BOX // 2
    assert row["relion"]["change_orientation_deg"] == pytest.approx(
        0.0, abs=1e-6
    )  # run_data.star = run_it003_data.star
    assert "| 4 (final: RELION) |" in tr.markdown(r) and "| 3 (final: ours) |" in tr.markdown(r)
    assert (
        r["summary"]["ours"]["final_iteration_without_itNNN_files"] is None
    )  # ours' run_model.star is its run_it003's
