"""`cryorefine simulate --junk FRACTION [--junk_map MAP]`: that fraction of the particles replaced by pure noise or by
projections of another map; which ones are junk is in the truth particles.star (rlnClassNumber 2), not in
particles_noposes.star. The other particles' images are those of the set without junk."""

import numpy as np
import pytest

from cryorefine.cli.main import main
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.particles import load_particles
from cryorefine.io.star import read_star
from cryorefine.io.table import read_images
from cryorefine.simulate import NO_POSES_STAR

N, BOX, ANGPIX = 40, 32, 4.0
BASE = ["--n", str(N), "--box", str(BOX), "--angpix", str(ANGPIX), "--seed", "6"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("junk")
    write_map(d / "other.mrc", atoms_to_map(*read_atoms(packaged_model("4E43.pdb")), BOX, ANGPIX).numpy(), ANGPIX)
    runs = {
        "clean": ["--snr", "0"],
        "noisy": ["--snr", "0.5"],
        "noise_junk": ["--snr", "0.5", "--junk", "0.25"],
        "map_junk": ["--snr", "0", "--junk", "0.25", "--junk_map", str(d / "other.mrc")],
        "other": ["--snr", "0", "--model", str(d / "other.mrc")],  # the other map's particles at the same poses
    }
    out = {}
    for name, extra in runs.items():
        assert main(["simulate", "--o", str(d / name), *BASE, *extra]) == 0
        images = read_images(load_particles(d / name / "particles.star"), np.arange(N)).astype(np.float64)
        out[name] = (read_star(d / name / "particles.star")["particles"], images)
    return d, out


def test_junk_is_marked_in_the_truth_only(sets):
    d, out = sets
    parts, _ = out["noise_junk"]
    assert sorted(parts["rlnClassNumber"].value_counts().items()) == [(1, 30), (2, 10)]
    assert "rlnClassNumber" not in read_star(d / "noise_junk" / NO_POSES_STAR)["particles"]
    assert "rlnClassNumber" not in out["noisy"][0]  # no column without --junk
    # the same particles are junk whatever the junk is made of
    np.testing.assert_array_equal(parts["rlnClassNumber"], out["map_junk"][0]["rlnClassNumber"])


def test_noise_junk_is_the_noise_alone(sets):
    d, out = sets
    parts, junk = out["noise_junk"]
    is_junk = parts["rlnClassNumber"].to_numpy() == 2
    clean, noisy = out["clean"][1], out["noisy"][1]
    np.testing.assert_array_equal(junk[~is_junk], noisy[~is_junk])  # the particles are as without junk
    k = read_map(d / "noisy" / "truth.mrc")[0].sum() / read_map(d / "clean" / "truth.mrc")[0].sum()  # 1 / noise σ
    np.testing.assert_allclose(junk[is_junk], (noisy - k * clean)[is_junk], atol=1e-4)
    assert 0.9 < junk[is_junk].std() < 1.1


def test_map_junk_is_the_other_maps_projections(sets):
    _, out = sets
    parts, junk = out["map_junk"]
    is_junk = parts["rlnClassNumber"].to_numpy() == 2
    np.testing.assert_array_equal(junk[~is_junk], out["clean"][1][~is_junk])
    other = out["other"][1][is_junk]
    scale = np.sum(junk[is_junk] * other) / np.sum(other * other)  # the other map scaled to the truth's power
    residual = np.linalg.norm(junk[is_junk] - scale * other) / np.linalg.norm(junk[is_junk])
    print(f"junk vs the other map's projections: relative residual {residual:.2e}, scale {scale:.3f}")
    assert residual < 1e-4
    # negative control: the truth's own projections are not the junk
    truth = out["clean"][1][is_junk]
    fit = np.sum(junk[is_junk] * truth) / np.sum(truth * truth)
    assert np.linalg.norm(junk[is_junk] - fit * truth) / np.linalg.norm(junk[is_junk]) > 0.3


@pytest.mark.parametrize(
    "extra, word",
    [(["--junk", "1"], "--junk"), (["--junk", "-0.1"], "--junk"), (["--junk_map", "x.mrc"], "--junk_map")],
)
def test_bad_junk_options_are_one_line_errors(tmp_path, capsys, extra, word):
    assert main(["simulate", "--o", str(tmp_path / "x"), *BASE, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
