"""A small auto-refinement end to end on CPU: it must converge to the known truth (poses and map).

Box 40 at 4.8 Å/px (Nyquist 9.6 Å), 300 particles of the packaged 6msm model at SNR 0.2, started from the truth
low-passed to 30 Å and from particles without poses (particles_noposes.star), as a user starts. Broken E-step signs,
CTF or M-step give median pose errors of tens of degrees and FSC-to-truth far below 0.5 at 30 Å, so the thresholds
below fail then.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.evaluation import map_resolution, pose_errors, read_poses, summarise_pose_errors
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.simulate import simulate_particles

BOX, ANGPIX = 40, 4.8


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine")
    xyz, w = read_atoms(packaged_model())
    truth = atoms_to_map(xyz, w, BOX, ANGPIX, bfactor=100.0)
    simulate_particles(truth, ANGPIX, d / "data", 300, snr=0.2, seed=7, max_shift_angst=6.0)
    t, _ = read_map(d / "data" / "truth.mrc")
    write_map(
        d / "data" / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX
    )
    rc = main(
        [
            "refine",
            "--i",
            str(d / "data" / "particles_noposes.star"),
            "--o",
            str(d / "out" / "run"),
            "--ref",
            str(d / "data" / "start.mrc"),
            "--ini_high",
            "30",
            "--particle_diameter",
            "170",
            "--ctf",
            "--norm",
            "--flatten_solvent",
            "--zero_mask",
            "--healpix_order",
            "2",
            "--auto_local_healpix_order",
            "4",
            "--offset_range",
            "3",
            "--offset_step",
            "1.5",
            "--iter",
            "6",
            "--random_seed",
            "1",
        ]
    )
    assert rc == 0
    return d, t


def test_outputs_have_relion_names(refined):
    d, _ = refined
    for name in [
        "run_class001.mrc",
        "run_half1_class001_unfil.mrc",
        "run_half2_class001_unfil.mrc",
        "run_data.star",
        "run_model.star",
        "run_it001_data.star",
        "run_it001_optimiser.star",
        "run_it001_sampling.star",
        "run_it001_half1_model.star",
        "run_it001_half1_class001.mrc",
        "run.log",
        "report.html",
    ]:
        assert (d / "out" / name).exists(), name


def test_poses_converge_to_truth(refined):
    d, _ = refined
    err = summarise_pose_errors(
        pose_errors(read_poses(d / "out" / "run_data.star"), read_poses(d / "data" / "particles.star"))
    )
    it1 = summarise_pose_errors(
        pose_errors(read_poses(d / "out" / "run_it001_data.star"), read_poses(d / "data" / "particles.star"))
    )
    assert it1["angle_median_deg"] > err["angle_median_deg"]  # the run improved on its first global search
    assert err["angle_median_deg"] < 8.0, err  # broken refinements give ~90°
    assert err["shift_median_angst"] < 3.0, err


def test_map_matches_truth(refined):
    d, truth = refined
    m, _ = read_map(d / "out" / "run_class001.mrc")
    res = map_resolution(torch.from_numpy(m), torch.from_numpy(truth), ANGPIX)["resolution_angst"]
    assert res[0.5] < 20.0, res
    # negative control: the truth against a map turned by 90° must score badly
    rot = np.rot90(truth, 1, axes=(0, 2)).copy()
    bad = map_resolution(torch.from_numpy(rot), torch.from_numpy(truth), ANGPIX)["resolution_angst"]
    assert bad[0.5] > 30.0, bad


def test_model_star_reports_resolution(refined):
    from cryorefine.io.star import read_star

    d, _ = refined
    blocks = read_star(d / "out" / "run_model.star")
    general = blocks["model_general"]
    res = float(general["rlnCurrentResolution"].iloc[0])
    assert 9.6 <= res < 30.0
    fsc = blocks["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    assert fsc[1] > 0.9


def test_each_half_set_has_its_own_model(refined):
    """RELION's half models: σ² and the average norm correction of each half set from its own particles (the norm
    average checked against data.star's rlnNormCorrection of that half); the final model pools both."""
    import starfile

    d, _ = refined
    data = starfile.read(d / "out" / "run_it001_data.star")["particles"]
    models = [starfile.read(d / "out" / f"run_it001_half{h}_model.star") for h in (1, 2)]
    for h, m in zip((1, 2), models):
        own = data["rlnNormCorrection"][data["rlnRandomSubset"] == h].mean()
        assert m["model_general"]["rlnNormCorrectionAverage"] == pytest.approx(own, rel=1e-5)
    assert models[0]["model_general"]["rlnNormCorrectionAverage"] != pytest.approx(
        models[1]["model_general"]["rlnNormCorrectionAverage"], rel=1e-6
    )
    s1, s2 = (m["model_group_1"]["rlnSigma2Noise"].to_numpy() for m in models)
    assert np.abs(s1[1:] / s2[1:] - 1).max() > 1e-3  # two estimates, not one pooled
    final = starfile.read(d / "out" / "run_data.star")["particles"]
    assert starfile.read(d / "out" / "run_model.star")["model_general"]["rlnNormCorrectionAverage"] == pytest.approx(
        final["rlnNormCorrection"].mean(), rel=1e-5
    )


def test_optimiser_star_names_the_half_set_models(refined):
    """RELION's auto-refine optimiser.star (MlOptimiser::write with split halves): rlnModelStarFile the half-1 model,
    rlnModelStarFile2 the half-2 model, each naming its own half's map; the final model.star names the final map.
    (tests/relion/test_relion_continue.py has RELION continue a classification, whose optimiser.star names one.)"""
    from cryorefine.io.star import read_star

    d, _ = refined
    out = d / "out"
    opt = read_star(out / "run_it001_optimiser.star")["optimiser_general"].iloc[0]
    assert int(opt["rlnDoAutoRefine"]) == 1 and int(opt["rlnDoSplitRandomHalves"]) == 1
    for h, label in ((1, "rlnModelStarFile"), (2, "rlnModelStarFile2")):
        assert opt[label] == str(out / f"run_it001_half{h}_model.star")
        image = read_star(opt[label])["model_classes"]["rlnReferenceImage"].iloc[0]
        assert image == str(out / f"run_it001_half{h}_class001.mrc") and (out / image).is_file()
    final = read_star(out / "run_model.star")["model_classes"]["rlnReferenceImage"].iloc[0]
    assert final == str(out / "run_class001.mrc")
    # the last iteration's half-1 model.star has run_model.star's tables (made once for both), naming its own map
    last = sorted(out.glob("run_it*_half1_model.star"))[-1]
    mine, joined = read_star(last), read_star(out / "run_model.star")
    assert list(mine) == list(joined) and len(mine) > 5
    assert mine["model_classes"]["rlnReferenceImage"].iloc[0] == str(last).replace("_model.star", "_class001.mrc")
    for name in mine:
        a, b = mine[name], joined[name]
        if name == "model_classes":
            a, b = a.drop(columns="rlnReferenceImage"), b.drop(columns="rlnReferenceImage")
        pd.testing.assert_frame_equal(a, b, obj=name)
