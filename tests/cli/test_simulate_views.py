"""`cryorefine simulate --preferred_view KAPPA [--uniform_fraction F]`: projection directions from a von Mises–Fisher
distribution about the z axis (density on the sphere ∝ exp(κ cos tilt)), a fraction of them uniform.

The tilts written to particles.star are tested against the distribution function of cos(tilt) (Kolmogorov–Smirnov);
the uniform directions of the default set are the control, which that test rejects."""

import numpy as np
import pytest
from scipy import stats

from cryorefine.cli.main import main
from cryorefine.io.star import read_star

N, KAPPA = 2000, 4.0
BASE = ["--n", str(N), "--box", "16", "--angpix", "8", "--snr", "0", "--no_ctf", "--seed", "9"]


def vmf_cdf(w, kappa=KAPPA):
    """Distribution function of w = cos(tilt) under the von Mises–Fisher distribution about +z."""
    return (np.exp(kappa * (w - 1)) - np.exp(-2 * kappa)) / (1 - np.exp(-2 * kappa))


def mixture_cdf(w, uniform=0.3):
    return uniform * (w + 1) / 2 + (1 - uniform) * vmf_cdf(w)


@pytest.fixture(scope="module")
def poses(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    runs = {
        "uniform": [],
        "vmf": ["--preferred_view", str(KAPPA)],
        "mixture": ["--preferred_view", str(KAPPA), "--uniform_fraction", "0.3"],
    }
    out = {}
    for name, extra in runs.items():
        assert main(["simulate", "--o", str(d / name), *BASE, *extra]) == 0
        out[name] = read_star(d / name / "particles.star")["particles"]
    return out


def _cos_tilt(parts):
    return np.cos(np.deg2rad(parts["rlnAngleTilt"].to_numpy()))


def test_directions_follow_the_von_mises_fisher_distribution(poses):
    w = _cos_tilt(poses["vmf"])
    p = stats.kstest(w, vmf_cdf).pvalue
    mean = 1 / np.tanh(KAPPA) - 1 / KAPPA  # E[cos tilt]
    print(f"vMF κ={KAPPA}: KS p {p:.3f}, mean cos(tilt) {w.mean():.4f} (expected {mean:.4f})")
    assert p > 1e-3 and abs(w.mean() - mean) < 0.01
    # control: uniform directions are rejected, and the mixture is neither
    assert stats.kstest(_cos_tilt(poses["uniform"]), vmf_cdf).pvalue < 1e-6
    assert stats.kstest(_cos_tilt(poses["mixture"]), mixture_cdf).pvalue > 1e-3
    assert stats.kstest(_cos_tilt(poses["mixture"]), vmf_cdf).pvalue < 1e-6


def test_only_the_tilts_change(poses):
    """rot, psi and the offsets are as in the uniform set (uniform in-plane and about z), so only the views move."""
    for col in ("rlnAngleRot", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_array_equal(poses["vmf"][col], poses["uniform"][col])
    assert stats.kstest((poses["vmf"]["rlnAngleRot"] + 180) / 360, "uniform").pvalue > 1e-3


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--preferred_view", "0"], "--preferred_view"),
        (["--preferred_view", "nan"], "--preferred_view"),
        (["--uniform_fraction", "0.5"], "--preferred_view"),
        (["--preferred_view", "2", "--uniform_fraction", "1.5"], "--uniform_fraction"),
    ],
)
def test_bad_view_options_are_one_line_errors(tmp_path, capsys, extra, word):
    assert main(["simulate", "--o", str(tmp_path / "x"), "--n", "4", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
