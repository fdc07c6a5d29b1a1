"""RELION's check that the particles were normalised (validate.normalisation_warning): simulated particles (background
mean 0, standard deviation 1, as relion_preprocess leaves them) pass; the same images scaled or offset, as an
un-normalised extraction leaves them, get RELION's warning and advice, in run.log too."""

import numpy as np
import pytest

from cryorefine.cli.main import main as cli
from cryorefine.io.mrc import write_stack
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.io.star import read_star, write_star
from cryorefine.validate import normalisation_warning
from small_set import small_set

BOX, ANGPIX, DIAMETER_ANGST = 32, 6.0, 170.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = small_set(tmp_path_factory.mktemp("norm"), BOX, ANGPIX, 40, seed=2)
    images = read_images(load_particles(d / "particles_noposes.star"), np.arange(40))
    for name, changed in (("scaled", images * 10.0), ("offset", images + 3.0)):
        write_stack(d / f"{name}.mrcs", changed.astype(np.float32), ANGPIX)
        blocks = read_star(d / "particles_noposes.star")
        blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@{d / name}.mrcs" for i in range(len(images))]
        write_star(d / f"{name}.star", blocks)
    return d


def test_normalised_particles_pass(data):
    assert normalisation_warning(load_particles(data / "particles_noposes.star"), DIAMETER_ANGST) is None


@pytest.mark.parametrize("name, figure", [("scaled", "standard deviation"), ("offset", "mean")])
def test_unnormalised_particles_are_flagged(data, name, figure):
    message = normalisation_warning(load_particles(data / f"{name}.star"), DIAMETER_ANGST)
    assert message is not None and figure in message and "relion_preprocess --norm" in message
    print(message)


def test_the_warning_reaches_run_log(data, tmp_path, capsys):
    flags = "--ini_high 30 --particle_diameter 170 --iter 1 --healpix_order 1 --j 1".split()
    argv = ["refine", "--i", str(data / "scaled.star"), "--o", str(tmp_path / "run"), "--ref", str(data / "start.mrc"),
            *flags]  # fmt: skip
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert "UserWarning: image" in err and "not normalised" in err
    assert "WARNING: image" in (tmp_path / "run.log").read_text()
