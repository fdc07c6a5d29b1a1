"""The RELION 3.1.3 jobs that follow a Refine3D job (Debian's binaries), on our auto-refine, run from the project
directory as RELION's jobs are. The input carries the columns of a real extraction (micrograph names, coordinates,
CTF-fit figures): run_data.star keeps every one of them with its values.

PostProcess: relion_postprocess on our half maps (``--i Refine3D/run_half1_class001_unfil.mrc``, half 2 found by its
name), with a soft mask relion_mask_create makes from our map (RELION 3.1.3's postprocess without a mask stops in its
plotting code).

Its unmasked and masked FSC of our halves are ours (``cryorefine fsc``, ``--mask``) shell by shell, so it reads our
maps, headers and origin as we do; its resolution is ours (the same phase-randomisation correction, with other random
phases: within one shell, and its reported Å is box·pixel/shell of our header's pixel size). Controls: a pixel size
1.5× in both headers moves RELION's resolution 1.5×; the mask shifted by 3 px gives another masked curve.

CtfRefine: relion_ctf_refine reads our run_data.star with that postprocess.star (our halves, RELION's mask and FSC)
and fits per-particle defocus and the beam tilt; its particles_ctf_refine.star keeps our columns and adds
rlnBeamTiltX/Y to the optics table.

Polish: relion_motion_refine needs MotionCorr's movies, which simulated particles do not have; it reads our
run_data.star and postprocess.star, matches our micrograph names to a corrected_micrographs.star, and stops only
when it looks for the first micrograph's motion file (the next input it would read).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import starfile

from cryorefine.cli.main import main as cli
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_star, write_star
from small_set import packaged_model_set

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_postprocess") is None or shutil.which("relion_mask_create") is None,
        reason="RELION binaries not installed",
    ),
]

BOX, ANGPIX = 32, 6.0
FLAGS = (
    "--ini_high 40 --particle_diameter 170 --ctf --flatten_solvent --zero_mask --healpix_order 1 --offset_range 2 "
    "--offset_step 2 --iter 3 --random_seed 2 --j 1"
).split()
CURVE_TOL = 1e-4  # FSC; measured 4e-6 (float32 maps, the curves as RELION prints them)


def extraction_columns(n: int) -> dict:
    """Columns an Extract job's particles carry and a refinement passes on: three micrographs, coordinates, CTF-fit
    figures of merit."""
    rng = np.random.default_rng(0)
    return {
        "rlnMicrographName": [f"MotionCorr/job002/Movies/mic{i % 3:03d}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(100, 3900, n).round(1),
        "rlnCoordinateY": rng.uniform(100, 3900, n).round(1),
        "rlnAutopickFigureOfMerit": rng.uniform(0, 5, n).round(4),
        "rlnCtfMaxResolution": rng.uniform(3, 6, n).round(4),
        "rlnCtfFigureOfMerit": rng.uniform(0.05, 0.3, n).round(5),
    }


def run(cwd, *args) -> str:
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Our refinement in Refine3D/ and RELION's mask of its map in MaskCreate/, in one project directory."""
    d = packaged_model_set(tmp_path_factory.mktemp("relion_after_refine"), 150, seed=7, box=BOX, angpix=ANGPIX)
    blocks = read_star(d / "particles_noposes.star")
    blocks["particles"] = blocks["particles"].assign(**extraction_columns(len(blocks["particles"])))
    write_star(d / "extracted.star", blocks)
    argv = ["refine", "--i", "extracted.star", "--o", "Refine3D/run", "--ref", "truth.mrc", *FLAGS]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        assert cli(argv) == 0
    (d / "MaskCreate").mkdir()
    run(d, "relion_mask_create", "--i", "Refine3D/run_class001.mrc", "--o", "MaskCreate/mask.mrc", "--ini_threshold",
        0.01, "--extend_inimask", 2, "--width_soft_edge", 3)  # fmt: skip
    return d


def postprocess(d, out: str, half1: str = "Refine3D/run_half1_class001_unfil.mrc") -> dict:
    (d / out).parent.mkdir(parents=True, exist_ok=True)  # the job folder, which RELION's pipeline makes
    run(d, "relion_postprocess", "--i", half1, "--o", out, "--mask", "MaskCreate/mask.mrc")
    return starfile.read(d / f"{out}.star")


def ours(d, half1: str, half2: str, *extra) -> tuple[dict, object]:
    """``cryorefine fsc``'s JSON line and curve table for two maps."""
    out = run(d, sys.executable, "-m", "cryorefine.cli.main", "fsc", half1, half2, "--o", "ours_fsc.star", *extra)
    return json.loads(out.splitlines()[-1]), starfile.read(d / "ours_fsc.star")


def test_relion_postprocess_reads_our_halves_with_our_fsc(project):
    d = project
    mask, mask_angpix = read_map(d / "MaskCreate/mask.mrc")
    assert mask_angpix == pytest.approx(ANGPIX) and 0.02 < mask.mean() < 0.9
    pp = postprocess(d, "PostProcess/postprocess")
    halves = ("Refine3D/run_half1_class001_unfil.mrc", "Refine3D/run_half2_class001_unfil.mrc")
    res, curve = ours(d, *halves, "--mask", "MaskCreate/mask.mrc")
    theirs, n = pp["fsc"], len(curve)
    for label in ("rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps"):
        print(
            f"{label}: ours - RELION's up to {np.abs(theirs[label].to_numpy()[:n] - curve[label].to_numpy()).max():.1e}"
        )
        np.testing.assert_allclose(theirs[label].to_numpy()[:n], curve[label].to_numpy(), atol=CURVE_TOL, err_msg=label)
    relion_res, our_res = float(pp["general"]["rlnFinalResolution"]), res["resolution_0.143_angst"]
    print(f"relion_postprocess {relion_res:.2f} Å, ours {our_res:.2f} Å")
    assert 2 * ANGPIX < our_res < 40.0  # a refined map, not noise: the comparison means something
    assert abs(BOX * ANGPIX / relion_res - BOX * ANGPIX / our_res) <= 1.0
    assert BOX * ANGPIX / relion_res == pytest.approx(round(BOX * ANGPIX / relion_res), abs=1e-3)


def test_control_a_wrong_pixel_size_moves_relion_resolution(project):
    d = project
    right = float(postprocess(d, "PostProcess/again")["general"]["rlnFinalResolution"])
    (d / "Wrong").mkdir()
    for h in (1, 2):
        m, _ = read_map(d / f"Refine3D/run_half{h}_class001_unfil.mrc")
        write_map(d / f"Wrong/run_half{h}_class001_unfil.mrc", m, ANGPIX * 1.5)
    mask, _ = read_map(d / "MaskCreate/mask.mrc")
    write_map(d / "MaskCreate/mask.mrc", mask, ANGPIX * 1.5)  # RELION refuses a mask of another pixel size
    try:
        wrong = float(
            postprocess(d, "PostProcess/wrong", "Wrong/run_half1_class001_unfil.mrc")["general"]["rlnFinalResolution"]
        )
    finally:
        write_map(d / "MaskCreate/mask.mrc", mask, ANGPIX)
    assert wrong == pytest.approx(1.5 * right, rel=1e-3)


def test_control_a_shifted_mask_gives_another_masked_curve(project):
    d = project
    theirs = postprocess(d, "PostProcess/shifted")["fsc"]["rlnFourierShellCorrelationMaskedMaps"].to_numpy()
    mask, _ = read_map(d / "MaskCreate/mask.mrc")
    write_map(d / "shifted_mask.mrc", np.roll(mask, 3, axis=2), ANGPIX)
    halves = ("Refine3D/run_half1_class001_unfil.mrc", "Refine3D/run_half2_class001_unfil.mrc")
    _, curve = ours(d, *halves, "--mask", "shifted_mask.mrc", "--force_mask")
    shifted = curve["rlnFourierShellCorrelationMaskedMaps"].to_numpy()
    print(f"masked FSC with the mask shifted 3 px: up to {np.abs(shifted - theirs[: len(shifted)]).max():.4f} off")
    assert np.abs(shifted - theirs[: len(shifted)]).max() > 0.005  # measured 0.019


def test_run_data_keeps_every_input_column(project):
    d = project
    # by image (the stack's name is rewritten relative to the directory the refinement ran in; one stack here)
    ours, given = (starfile.read(d / f)["particles"] for f in ("Refine3D/run_data.star", "extracted.star"))
    ours, given = (t.set_index(t["rlnImageName"].str.split("@").str[0]) for t in (ours, given))
    assert set(given.columns) <= set(ours.columns), set(given.columns) - set(ours.columns)
    for col in extraction_columns(1):
        got = ours.loc[given.index, col].to_numpy()
        assert (got == given[col].to_numpy()).all() if got.dtype == object else np.allclose(got, given[col]), col


def test_relion_ctf_refine_reads_our_run_data(project):
    d = project
    postprocess(d, "PostProcess/job010/postprocess")
    (d / "CtfRefine/job011").mkdir(parents=True)
    log = run(d, "relion_ctf_refine", "--i", "Refine3D/run_data.star", "--f", "PostProcess/job010/postprocess.star",
              "--o", "CtfRefine/job011/", "--fit_defocus", "--kmin_defocus", 30, "--fit_mode", "fpmfm",
              "--fit_beamtilt", "--kmin_tilt", 30, "--j", 1)  # fmt: skip
    assert "ERROR" not in log
    out = starfile.read(d / "CtfRefine/job011/particles_ctf_refine.star")
    ours = starfile.read(d / "Refine3D/run_data.star")
    assert len(out["particles"]) == len(ours["particles"])
    assert set(ours["particles"].columns) <= set(out["particles"].columns)
    assert {"rlnBeamTiltX", "rlnBeamTiltY"} <= set(out["optics"].columns)
    assert np.isfinite(out["particles"]["rlnDefocusU"].to_numpy(dtype=float)).all()


def test_relion_polish_reads_our_run_data_up_to_the_movies(project):
    d = project
    postprocess(d, "PostProcess/job020/postprocess")
    mics = sorted(set(extraction_columns(150)["rlnMicrographName"]))
    optics = read_star(d / "Refine3D/run_data.star")["optics"].rename(
        columns={"rlnImagePixelSize": "rlnMicrographPixelSize"}
    )[["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographPixelSize", "rlnVoltage", "rlnSphericalAberration",
       "rlnAmplitudeContrast"]]  # fmt: skip
    corrected = pd.DataFrame(
        {"rlnMicrographName": mics, "rlnMicrographMetadata": [m.replace(".mrc", ".star") for m in mics],
         "rlnOpticsGroup": 1}
    )  # fmt: skip
    (d / "MotionCorr/job002").mkdir(parents=True)
    write_star(d / "MotionCorr/job002/corrected_micrographs.star", {"optics": optics, "micrographs": corrected})
    (d / "Polish/job021").mkdir(parents=True)
    argv = ["relion_motion_refine", "--i", "Refine3D/run_data.star", "--f", "PostProcess/job020/postprocess.star",
            "--corr_mic", "MotionCorr/job002/corrected_micrographs.star", "--o", "Polish/job021/", "--first_frame", "1",
            "--last_frame", "-1", "--params3", "--j", "1"]  # fmt: skip
    p = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    print(log[-1500:])
    assert p.returncode != 0 and "MotionCorr/job002/Movies/mic000.star" in log, log[-3000:]


@pytest.mark.skipif(shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None, reason="no MPI RELION")
def test_relion_continues_our_auto_refine(project):
    """``relion_refine_mpi --continue run_it002_optimiser.star`` (auto-refine needs its MPI program for the half sets)
    reads our optimiser, both half models, data and sampling files and runs iteration 3 (--auto_iter_max 3 stops it
    there; without it RELION went on to converge, 11 iterations in 222 s here): both half models and maps, a posterior
    that is not flat, and a half-set resolution within one shell of ours at iteration 2."""
    d = project
    argv = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi", "--continue",
            "Refine3D/run_it002_optimiser.star", "--o", "Refine3D/run_ct2", "--auto_iter_max", "3", "--j", "1",
            "--dont_combine_weights_via_disc"]  # fmt: skip
    log = run(d, *argv)
    assert "ERROR" not in log and "Auto-refine: Iteration= 3" in log
    for suffix in ("data.star", "optimiser.star", "sampling.star", "half1_model.star", "half2_model.star",
                   "half1_class001.mrc", "half2_class001.mrc"):  # fmt: skip
        assert (d / f"Refine3D/run_ct2_it003_{suffix}").is_file(), suffix
    shells = []
    for model in ("Refine3D/run_ct2_it003_half1_model.star", "Refine3D/run_it002_half1_model.star"):
        general = starfile.read(d / model)["model_general"]
        shells.append(BOX * ANGPIX / float(general["rlnCurrentResolution"]))
        if "ct2" in model:
            assert float(general["rlnAveragePmax"]) > 0.05, "RELION's E-step on our files is flat"
    print(f"RELION's iteration-3 resolution shell {shells[0]:.2f}, ours at iteration 2 {shells[1]:.2f}")
    assert abs(shells[0] - shells[1]) <= 1.0 + 1e-6
