"""`cryorefine simulate --map M --poses STAR`: projection at given poses, CTFs and offsets (the benchmark data path).

Against two independent sources of the same images: our random-pose simulator (its particles.star fed back as the
poses) and, where installed, relion_project --ang --ctf on make_bench_data.py's poses.star (RELION 3.1, optics table).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryorefine.cli.main import main
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.io.star import read_star, write_star
from cryorefine.simulate import simulate_particles

REPO = Path(__file__).resolve().parents[2]
BOX, ANGPIX = 32, 3.0


def _rel_err(a, b):
    return np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("poses")
    truth = atoms_to_map(*read_atoms(packaged_model("4E43.pdb")), BOX, ANGPIX)
    simulate_particles(truth, ANGPIX, d / "sim", 24, snr=0, astigmatism_angst=2000.0, max_shift_angst=6.0, seed=4)
    return d


def test_poses_reproduce_the_simulator(sim, monkeypatch):
    d = sim
    monkeypatch.chdir(d)  # the project directory: image names are written relative to it
    rc = main(
        [
            "simulate",
            "--map",
            str(d / "sim" / "truth.mrc"),
            "--poses",
            str(d / "sim" / "particles.star"),
            "--o",
            str(d / "p"),
            "--snr",
            "0",
            "--batch",
            "7",
        ]
    )
    assert rc == 0
    ours = read_images(load_particles(d / "p" / "particles.star"), np.arange(24))
    ref = read_images(load_particles(d / "sim" / "particles.star"), np.arange(24))
    assert _rel_err(ours, ref).max() < 1e-4
    # the truth columns are kept, image names point at the new stack
    a, b = read_star(d / "p" / "particles.star")["particles"], read_star(d / "sim" / "particles.star")["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-5)
    assert a["rlnImageName"].iloc[0] == "000001@p/particles.mrcs"
    # negative control: without the CTF the images are far off
    assert (
        main(
            [
                "simulate",
                "--map",
                str(d / "sim" / "truth.mrc"),
                "--poses",
                str(d / "sim" / "particles.star"),
                "--o",
                str(d / "q"),
                "--snr",
                "0",
                "--no_ctf",
            ]
        )
        == 0
    )
    assert _rel_err(read_images(load_particles(d / "q" / "particles.star"), np.arange(24)), ref).min() > 0.3


def test_poses_with_noise_keep_the_greyscale(sim):
    d = sim
    assert (
        main(
            [
                "simulate",
                "--map",
                str(d / "sim" / "truth.mrc"),
                "--poses",
                str(d / "sim" / "particles.star"),
                "--o",
                str(d / "n"),
                "--snr",
                "0.5",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    noisy = read_images(load_particles(d / "n" / "particles.star"), np.arange(24))
    clean = read_images(load_particles(d / "sim" / "particles.star"), np.arange(24))
    snr = clean.var(axis=(1, 2)).mean() / (noisy - clean).var()
    assert 0.4 < snr < 0.6


def test_pose_file_that_does_not_fit_the_map_is_one_line_error(sim, capsys):
    d = sim
    blocks = read_star(d / "sim" / "particles.star")
    blocks["optics"]["rlnImageSize"] = BOX + 2
    write_star(d / "bad.star", blocks)
    assert (
        main(["simulate", "--map", str(d / "sim" / "truth.mrc"), "--poses", str(d / "bad.star"), "--o", str(d / "b")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rlnImageSize" in err[0]


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_project") is None, reason="RELION binaries not installed")
def test_bench_poses_match_relion_project(tmp_path):
    """make_bench_data.py's poses.star (RELION 3.1, no images) through relion_project --ctf and through ours."""
    env = {"BENCH_MODEL": str(packaged_model("4E43.pdb")), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "make_bench_data.py"), str(tmp_path), "32", "4.0", "40", "2", "20"],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        ["relion_project", "--i", "truth.mrc", "--ang", "poses.star", "--ctf", "--o", "rp"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    assert (
        main(
            [
                "simulate",
                "--map",
                str(tmp_path / "truth.mrc"),
                "--poses",
                str(tmp_path / "poses.star"),
                "--o",
                str(tmp_path / "ours"),
                "--snr",
                "0",
            ]
        )
        == 0
    )
    import mrcfile

    theirs = mrcfile.read(tmp_path / "rp.mrcs").astype(np.float64)
    ours = mrcfile.read(tmp_path / "ours" / "particles.mrcs").astype(np.float64)
    assert ours.shape == theirs.shape == (40, 32, 32)
    err = _rel_err(ours, theirs)
    print(f"relative error to relion_project: median {np.median(err):.4f}, max {err.max():.4f}")
    assert err.max() < 0.04
    # negative control: the origin offsets negated in the poses file
    blocks = read_star(tmp_path / "poses.star")
    blocks["particles"]["rlnOriginXAngst"] *= -1
    blocks["particles"]["rlnOriginYAngst"] *= -1
    write_star(tmp_path / "flipped.star", blocks)
    assert (
        main(
            [
                "simulate",
                "--map",
                str(tmp_path / "truth.mrc"),
                "--poses",
                str(tmp_path / "flipped.star"),
                "--o",
                str(tmp_path / "flip"),
                "--snr",
                "0",
            ]
        )
        == 0
    )
    flipped = mrcfile.read(tmp_path / "flip" / "particles.mrcs").astype(np.float64)
    assert np.median(_rel_err(flipped, theirs)) > 0.1
