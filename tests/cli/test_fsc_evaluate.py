"""`cryorefine fsc`, `cryorefine evaluate` and `cryorefine reconstruct` through the command line entry point."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.evaluation import match_particles, pose_errors, read_poses
from cryorefine.geometry.euler import euler_to_matrix, matrix_to_euler
from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.io.mrc import write_map
from cryorefine.io.star import read_star, write_star
from cryorefine.simulate import simulate_particles

BOX, ANGPIX = 32, 4.0


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else err)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    d = tmp_path_factory.mktemp("maps")
    truth = atoms_to_map(*read_atoms(packaged_model()), BOX, ANGPIX).numpy().astype(np.float32)
    noise = torch.randn(BOX, BOX, BOX, generator=torch.Generator().manual_seed(0)).numpy()
    write_map(d / "a.mrc", truth, ANGPIX)
    write_map(d / "noise.mrc", noise, ANGPIX)
    write_map(d / "other_pixel.mrc", truth, ANGPIX * 1.1)
    write_map(d / "other_box.mrc", truth[:30, :30, :30], ANGPIX)
    return d


def test_fsc_identical_maps_reach_nyquist(maps, capsys, tmp_path):
    rc, out = run(capsys, "fsc", maps / "a.mrc", maps / "a.mrc", "--o", tmp_path / "c.csv")
    assert rc == 0
    assert out["resolution_0.143_angst"] == pytest.approx(2 * ANGPIX) and out["resolution_0.5_angst"] == pytest.approx(
        2 * ANGPIX
    )
    curve = pd.read_csv(tmp_path / "c.csv")
    assert list(curve.columns) == ["shell", "resolution_angst", "fsc"] and len(curve) == BOX // 2 + 1
    assert np.allclose(curve["fsc"], 1.0) and curve["resolution_angst"].iloc[-1] == pytest.approx(2 * ANGPIX)
    rc, out = run(capsys, "fsc", maps / "a.mrc", maps / "a.mrc", "--o", tmp_path / "c.star")
    star = read_star(tmp_path / "c.star")["fsc"]
    assert rc == 0 and np.allclose(star["rlnFourierShellCorrelation"], 1.0) and len(star) == BOX // 2 + 1


def test_program_ends_with_its_output_and_code(maps, capsys, tmp_path):
    """The program as a user runs it (console(): the process ends by os._exit once main() returns): its piped, so
    block-buffered, output arrives whole, and its exit code is main()'s, for a finished command and for bad input."""
    program = [sys.executable, "-m", "cryorefine.cli.main", "fsc", str(maps / "a.mrc")]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [*program, str(maps / "noise.mrc")], capture_output=True, text=True, check=False, env=buffered
    )
    rc, in_process = run(capsys, "fsc", maps / "a.mrc", maps / "noise.mrc")
    assert done.returncode == rc == 0 and json.loads(done.stdout.strip().splitlines()[-1]) == in_process
    bad = subprocess.run([*program, str(tmp_path / "missing.mrc")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "missing.mrc" in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_fsc_against_noise_is_low(maps, capsys):
    rc, out = run(capsys, "fsc", maps / "a.mrc", maps / "noise.mrc")
    assert rc == 0
    print(out)
    for key in ("resolution_0.143_angst", "resolution_0.5_angst"):
        assert out[key] is None or out[key] >= 10 * ANGPIX, out  # at most a few shells


def test_fsc_angpix_override_and_errors(maps, capsys):
    rc, err = run(capsys, "fsc", maps / "a.mrc", maps / "other_box.mrc")
    assert rc == 2 and "other_box.mrc" in err and "a.mrc" in err and "box" in err
    rc, err = run(capsys, "fsc", maps / "a.mrc", maps / "other_pixel.mrc")
    assert rc == 2 and "other_pixel.mrc" in err and "pixel size" in err
    rc, out = run(capsys, "fsc", maps / "a.mrc", maps / "other_pixel.mrc", "--angpix", 2.0)
    assert rc == 0 and out["resolution_0.143_angst"] == pytest.approx(4.0)


def test_fsc_mask_errors(maps, capsys):
    rc, err = run(capsys, "fsc", maps / "a.mrc", maps / "a.mrc", "--mask", maps / "other_box.mrc")
    assert rc == 2 and "other_box.mrc" in err and "box" in err and len(err.strip().splitlines()) == 1
    rc, err = run(capsys, "fsc", maps / "a.mrc", maps / "a.mrc", "--mask", maps / "noise.mrc")
    assert rc == 2 and "noise.mrc" in err and "0..1" in err
    # identical maps: the unmasked FSC never drops below 0.8, so the shell must be given
    write_map(maps / "ones.mrc", np.ones((BOX,) * 3, np.float32), ANGPIX)
    rc, err = run(capsys, "fsc", maps / "a.mrc", maps / "a.mrc", "--mask", maps / "ones.mrc")
    assert rc == 2 and "--randomize_at_A" in err
    rc, out = run(capsys, "fsc", maps / "a.mrc", maps / "a.mrc", "--mask", maps / "ones.mrc", "--randomize_at_A", 20)
    assert rc == 0 and out["resolution_0.143_angst"] == pytest.approx(2 * ANGPIX)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    truth = atoms_to_map(*read_atoms(packaged_model()), BOX, ANGPIX)
    simulate_particles(truth, ANGPIX, d, 200, snr=0, max_shift_angst=5.0, astigmatism_angst=1000.0, seed=2)
    return d


def rotated_star(sim, path, R=None, shift=(0.0, 0.0), names=None):
    """The truth STAR file with every pose A turned to R·A (R (n,3,3) or None) and origins moved by ``shift`` Å."""
    blocks = read_star(sim / "particles.star")
    p = blocks["particles"].copy()
    if R is not None:
        A = euler_to_matrix(
            *(p[c].to_numpy(dtype=np.float64, copy=True) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        )
        rot, tilt, psi = (a.numpy() for a in matrix_to_euler(R @ A))
        p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"] = rot, tilt, psi
    p["rlnOriginXAngst"] += shift[0]
    p["rlnOriginYAngst"] += shift[1]
    if names is not None:
        p["rlnImageName"] = names(p["rlnImageName"])
    write_star(path, {"optics": blocks["optics"], "particles": p.iloc[::-1].reset_index(drop=True)})  # other order
    return path


def random_rotations(n, angle_deg, seed=0):
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=1)
    K = torch.zeros(n, 3, 3, dtype=torch.float64)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    K = K - K.transpose(1, 2)
    t = np.deg2rad(angle_deg)
    return torch.eye(3, dtype=torch.float64) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def test_evaluate_truth_against_itself(sim, capsys):
    rc, out = run(
        capsys,
        "evaluate",
        "--data",
        sim / "particles.star",
        "--truth",
        sim / "particles.star",
        "--map",
        sim / "truth.mrc",
        "--truth_map",
        sim / "truth.mrc",
    )
    assert rc == 0, out
    assert out["n_matched"] == 200
    assert out["angle_median_deg"] < 1e-3 and out["angle_p90_deg"] < 1e-3 and out["shift_p90_angst"] < 1e-6
    assert out["map_fsc_0.5_angst"] == pytest.approx(2 * ANGPIX) and out["map_fsc_0.143_angst"] == pytest.approx(
        2 * ANGPIX
    )


def test_evaluate_known_perturbation(sim, capsys, tmp_path):
    data = rotated_star(
        sim,
        tmp_path / "run_data.star",
        R=random_rotations(200, 5.0),
        shift=(3.0, 4.0),
        names=lambda s: s.str.replace("particles.mrcs", "Extract/job007/particles.mrcs"),
    )
    rc, out = run(capsys, "evaluate", "--data", data, "--truth", sim / "particles.star")
    assert rc == 0, out
    print(out)
    assert out["n_matched"] == 200
    assert out["angle_median_deg"] == pytest.approx(5.0, abs=1e-3) and out["angle_p90_deg"] == pytest.approx(
        5.0, abs=1e-3
    )
    assert out["shift_median_angst"] == pytest.approx(5.0, abs=1e-4)


def test_pose_errors_symmetry_aware(sim, tmp_path):
    """Poses A·S (RELION's symmetry mates) are 0° off under C2 and 180° off under C1."""
    S = symmetry_matrices("C2")[1]
    blocks = read_star(sim / "particles.star")
    p = blocks["particles"].copy()
    A = (
        euler_to_matrix(
            *(p[c].to_numpy(dtype=np.float64, copy=True) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        )
        @ S
    )
    rot, tilt, psi = (a.numpy() for a in matrix_to_euler(A))
    p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"] = rot, tilt, psi
    write_star(tmp_path / "mates.star", {"optics": blocks["optics"], "particles": p})
    data, truth = read_poses(tmp_path / "mates.star"), read_poses(sim / "particles.star")
    assert np.abs(pose_errors(data, truth, "C2")["angle_deg"]).max() < 1e-6
    assert np.allclose(pose_errors(data, truth, "C1")["angle_deg"], 180.0, atol=1e-6)


def test_evaluate_errors(sim, capsys, tmp_path):
    data = rotated_star(sim, tmp_path / "other.star", names=lambda s: s.str.replace("particles.mrcs", "other.mrcs"))
    rc, err = run(capsys, "evaluate", "--data", data, "--truth", sim / "particles.star")
    assert rc == 2 and "rlnImageName" in err
    rc, err = run(
        capsys,
        "evaluate",
        "--data",
        sim / "particles.star",
        "--truth",
        sim / "particles.star",
        "--map",
        sim / "truth.mrc",
    )
    assert rc == 2 and "--truth_map" in err
    rc, err = run(capsys, "evaluate", "--data", tmp_path / "missing.star", "--truth", sim / "particles.star")
    assert rc == 2 and "missing.star" in err


def test_match_particles_pixel_origins(tmp_path):
    """STAR 3.0 (rlnOriginX in pixels) against 3.1 (Å); names with different zero padding still match."""
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [2.0],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    p31 = pd.DataFrame(
        {
            "rlnImageName": ["000001@s.mrcs", "000002@s.mrcs"],
            "rlnAngleRot": [0.0, 10.0],
            "rlnAngleTilt": [0.0, 20.0],
            "rlnAnglePsi": [0.0, 30.0],
            "rlnOriginXAngst": [2.0, 0.0],
            "rlnOriginYAngst": [0.0, 4.0],
            "rlnOpticsGroup": [1, 1],
        }
    )
    p30 = pd.DataFrame(
        {
            "rlnImageName": ["2@sub/s.mrcs", "1@sub/s.mrcs"],
            "rlnAngleRot": [10.0, 0.0],
            "rlnAngleTilt": [20.0, 0.0],
            "rlnAnglePsi": [30.0, 0.0],
            "rlnOriginX": [0.0, 1.0],
            "rlnOriginY": [2.0, 0.0],
            "rlnDetectorPixelSize": [5.0, 5.0],
            "rlnMagnification": [25000.0, 25000.0],
            "rlnVoltage": [300.0] * 2,
            "rlnSphericalAberration": [2.7] * 2,
            "rlnAmplitudeContrast": [0.1] * 2,
        }
    )
    write_star(tmp_path / "a.star", {"optics": optics, "particles": p31})
    write_star(tmp_path / "b.star", {"images": p30})
    a, b = read_poses(tmp_path / "a.star"), read_poses(tmp_path / "b.star")
    i_a, i_b = match_particles(a, b)
    assert sorted(zip(i_a.tolist(), i_b.tolist())) == [(0, 1), (1, 0)]
    e = pose_errors(a, b)
    assert np.abs(e["angle_deg"]).max() < 1e-9 and np.abs(e["shift_angst"]).max() < 1e-9


def test_reconstruct_cli(sim, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(sim)
    rc, out = run(capsys, "reconstruct", "--i", "particles.star", "--o", tmp_path / "rec.mrc", "--ctf", "--subset", 1)
    assert rc == 0, out
    assert out["n_particles"] == 100 and out["box"] == BOX and out["angpix"] == ANGPIX
    rc, fsc = run(capsys, "fsc", tmp_path / "rec.mrc", sim / "truth.mrc")
    assert rc == 0 and fsc["resolution_0.5_angst"] <= 3 * ANGPIX
    rc, err = run(capsys, "reconstruct", "--i", "particles.star", "--o", tmp_path / "rec.txt")
    assert rc == 2 and ".mrc" in err
