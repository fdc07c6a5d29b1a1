"""`cryorefine simulate --micrographs M --defocus_spread S --mic_scale MIN MAX`: particles divided among micrographs,
each with its defocus and a scale of its signal (not its noise); the truth per micrograph in micrographs_truth.star,
never in the particle STAR files a refinement reads."""

import numpy as np
import pytest

from cryorefine.cli.main import main
from cryorefine.io.particles import load_particles
from cryorefine.io.star import read_star
from cryorefine.io.table import read_images
from cryorefine.simulate import MICROGRAPHS_TRUTH_STAR, NO_POSES_STAR

N, M = 60, 4
BASE = ["--n", str(N), "--box", "32", "--angpix", "4", "--seed", "5", "--max_shift", "3"]


def _run(out, *extra):
    assert main(["simulate", "--o", str(out), *BASE, *extra]) == 0
    blocks = read_star(out / "particles.star")
    return blocks["particles"], read_images(load_particles(out / "particles.star"), np.arange(N)).astype(np.float64)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("mics")
    mics = ["--micrographs", str(M), "--defocus_spread", "40"]
    return {
        "clean": _run(d / "clean", "--snr", "0", *mics),
        "scaled": _run(d / "scaled", "--snr", "0", *mics, "--mic_scale", "0.5", "2"),
        "noisy": _run(d / "noisy", "--snr", "0.5", *mics),
        "noisy_scaled": _run(d / "noisy_scaled", "--snr", "0.5", *mics, "--mic_scale", "0.5", "2"),
        "dir": d,
    }


def test_each_micrograph_has_its_defocus_and_the_particles_a_spread(sets):
    parts, _ = sets["clean"]
    truth = read_star(sets["dir"] / "clean" / MICROGRAPHS_TRUTH_STAR)["micrographs"]
    assert list(truth["rlnMicrographName"]) == [f"MotionCorr/job002/Movies/mic{m:04d}.mrc" for m in range(1, M + 1)]
    assert (parts["rlnMicrographName"].value_counts() == N // M).all()
    assert parts["rlnMicrographName"].is_monotonic_increasing  # contiguous runs, as extracted
    mic = truth.set_index("rlnMicrographName").loc[parts["rlnMicrographName"]]
    du = parts["rlnDefocusU"].to_numpy() - mic["rlnDefocusU"].to_numpy()
    dv = parts["rlnDefocusV"].to_numpy() - mic["rlnDefocusV"].to_numpy()
    np.testing.assert_allclose(du, dv, atol=1e-3)  # the particle's height moves U and V together
    assert 25 < du.std() < 55  # --defocus_spread 40 Å (sd), 60 particles
    np.testing.assert_allclose(parts["rlnDefocusAngle"], mic["rlnDefocusAngle"], atol=1e-4)
    assert ((truth["rlnDefocusU"] > 9000) & (truth["rlnDefocusU"] < 26000)).all()
    assert truth["rlnDefocusU"].std() > 1000  # drawn per micrograph over the default 1-2.5 µm
    # the input of a refinement: the micrograph's defocus (what CTF estimation gives), no truth of the scale
    inp = read_star(sets["dir"] / "clean" / NO_POSES_STAR)["particles"]
    np.testing.assert_allclose(inp["rlnDefocusU"], mic["rlnDefocusU"], atol=1e-4)
    assert "rlnGroupScaleCorrection" not in inp and "rlnGroupScaleCorrection" not in parts
    assert (truth["rlnGroupScaleCorrection"] == 1).all()  # --mic_scale 1 1 by default


def test_the_scale_multiplies_the_signal_not_the_noise(sets):
    _, clean = sets["clean"]
    _, scaled = sets["scaled"]
    truth = read_star(sets["dir"] / "scaled" / MICROGRAPHS_TRUTH_STAR)["micrographs"]
    scale = truth["rlnGroupScaleCorrection"].to_numpy()
    assert ((scale >= 0.5) & (scale <= 2)).all() and scale.max() / scale.min() > 1.5
    of = np.arange(N) * M // N
    np.testing.assert_allclose(scaled, clean * scale[of, None, None], rtol=1e-4, atol=1e-4 * np.abs(clean).max())
    # with noise: the difference the scale makes is signal only; the noise is the same in both sets
    _, noisy = sets["noisy"]
    _, noisy_scaled = sets["noisy_scaled"]
    signal = noisy_scaled - noisy
    d = (scale[of, None, None] - 1) * clean
    k = np.sum(signal * d) / np.sum(d * d)  # 1 / noise sigma: the noisy sets' greyscale
    assert np.abs(signal - k * d).max() < 1e-3 * np.abs(signal).max()
    assert 0.9 < (noisy - k * clean).std() < 1.1  # the noise: unit variance in both


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--micrographs", "0"], "--micrographs"),
        (["--micrographs", str(N + 1)], "--micrographs"),
        (["--mic_scale", "0.5", "2"], "--micrographs"),
        (["--defocus_spread", "30"], "--micrographs"),
        (["--micrographs", "2", "--mic_scale", "2", "1"], "--mic_scale"),
        (["--micrographs", "2", "--defocus_spread", "-1"], "--defocus_spread"),
        (["--micrographs", "2", "--poses", "poses.star"], "--poses"),
    ],
)
def test_bad_micrograph_options_are_one_line_errors(tmp_path, capsys, extra, word):
    assert main(["simulate", "--o", str(tmp_path / "x"), *BASE, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
