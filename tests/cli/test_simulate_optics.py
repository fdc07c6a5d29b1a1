"""`cryorefine simulate --optics "A1:B1,A2:B2"`: optics groups of different pixel sizes and boxes, each group's images
in a stack of their own, projected from a truth built from the atomic model at that group's sampling.

Checked against an independent path: each group's rows fed back through `simulate --poses` (project_poses, the
atomic model built at the pixel size and box of that group's optics row) give the same images."""

import numpy as np
import pytest

from cryorefine.cli.main import main
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.io.star import read_star, write_star
from cryorefine.io.table import read_images
from cryorefine.simulate import NO_POSES_STAR

N = 30
GROUPS = [(4.0, 32), (4.4, 30)]
OPTICS = ",".join(f"{a}:{b}" for a, b in GROUPS)
COMMON = ["--n", str(N), "--seed", "2", "--snr", "0", "--max_shift", "4", "--astigmatism", "1000"]


def _rel_err(a, b):
    return np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("optics")
    assert main(["simulate", "--o", str(d / "s"), "--optics", OPTICS, "--beam_tilt", "0.5", "-0.3", *COMMON]) == 0
    # without aberrations, which --poses refuses: the set the independent path reproduces
    assert main(["simulate", "--o", str(d / "plain"), "--optics", OPTICS, *COMMON]) == 0
    return d


def test_each_group_has_its_optics_row_and_stack(sim):
    blocks = read_star(sim / "s" / "particles.star")
    optics, parts = blocks["optics"], blocks["particles"]
    assert list(optics["rlnOpticsGroup"]) == [1, 2]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], [a for a, _ in GROUPS])
    assert list(optics["rlnImageSize"]) == [b for _, b in GROUPS]
    np.testing.assert_allclose(optics["rlnBeamTiltX"], [0.5, 0.5])  # the aberrations apply to every group
    assert list(parts["rlnOpticsGroup"].value_counts().sort_index()) == [N // 2, N // 2]
    for g in (1, 2):
        stacks = {name.split("@")[1] for name in parts.loc[parts["rlnOpticsGroup"] == g, "rlnImageName"]}
        assert len(stacks) == 1 and stacks.pop().endswith(f"particles_opticsGroup{g}.mrcs")
    truth, angpix = read_map(sim / "s" / "truth.mrc")
    assert truth.shape == (32, 32, 32) and abs(angpix - 4.0) < 1e-4  # the first group's, as RELION writes
    assert list(read_star(sim / "s" / NO_POSES_STAR)["optics"]["rlnImageSize"]) == [32, 30]


@pytest.mark.parametrize("group", [1, 2])
def test_each_group_is_projected_from_the_truth_at_its_own_sampling(sim, group, monkeypatch):
    monkeypatch.chdir(sim)  # image names are relative to the project directory
    blocks = read_star(sim / "plain" / "particles.star")
    parts = blocks["particles"]
    rows = parts["rlnOpticsGroup"] == group
    optics = blocks["optics"][blocks["optics"]["rlnOpticsGroup"] == group]
    write_star(sim / f"g{group}.star", {"optics": optics, "particles": parts[rows]})
    assert main(["simulate", "--poses", str(sim / f"g{group}.star"), "--o", str(sim / f"p{group}"), "--snr", "0"]) == 0
    theirs = read_images(load_particles(sim / f"p{group}" / "particles.star"), np.arange(int(rows.sum())))
    ours = read_images(load_particles(sim / "plain" / "particles.star"), np.flatnonzero(rows))
    err = _rel_err(ours, theirs)
    print(f"group {group}: relative error to project_poses, max {err.max():.2e}")
    assert err.max() < 1e-4
    # negative control: the other group's pixel size in the poses' optics row (the truth built at it, box kept)
    other = GROUPS[2 - group][0]
    write_star(sim / f"w{group}.star", {"optics": optics.assign(rlnImagePixelSize=other), "particles": parts[rows]})
    assert main(["simulate", "--poses", str(sim / f"w{group}.star"), "--o", str(sim / f"w{group}"), "--snr", "0"]) == 0
    wrong = read_images(load_particles(sim / f"w{group}" / "particles.star"), np.arange(int(rows.sum())))
    assert np.median(_rel_err(ours, wrong)) > 0.1


def test_a_map_cannot_make_groups_of_several_pixel_sizes(sim, capsys):
    rc = main(["simulate", "--map", str(sim / "s" / "truth.mrc"), "--o", str(sim / "m"), "--optics", OPTICS])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "atomic model" in err[0], err


@pytest.mark.parametrize("optics", ["4.0", "4.0:32,x:30", "4.0:32,-1:30", "4.0:0"])
def test_bad_optics_are_one_line_errors(tmp_path, capsys, optics):
    assert main(["simulate", "--o", str(tmp_path / "x"), "--n", "4", "--optics", optics]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--optics" in err[0], err
