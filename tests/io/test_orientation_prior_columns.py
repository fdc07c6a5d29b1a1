"""The orientation priors of a STAR file (rlnAngleRot/Tilt/PsiPrior, rlnOriginX/YPriorAngst and STAR 3.0's
rlnOriginX/YPrior in pixels): read as numbers, checked (one line naming the file, column and row), written back."""

import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import CryoInputError
from cryorefine.io.particles import load_particles, write_particles
from cryorefine.io.star import read_star, write_star

from test_particles import make_stack, optics_df, particles_df

PRIORS = {
    "rlnAngleRotPrior": [10.0, -170.0, 999.0, 0.0, 5.0, 6.0],
    "rlnAngleTiltPrior": [90.0] * 6,
    "rlnAnglePsiPrior": [-45.0, 30.0, 200.0, 0.0, 1.0, -360.0],
    "rlnOriginXPriorAngst": [1.5, 0.0, -2.0, 0.0, 0.0, 3.0],
    "rlnOriginYPriorAngst": [0.0] * 6,
}


@pytest.fixture
def star(tmp_path, monkeypatch):
    make_stack(tmp_path / "Particles" / "stack.mrcs", 6)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "particles.star"


def test_priors_read_and_kept_in_the_output(star, tmp_path):
    write_star(star, {"optics": optics_df(), "particles": particles_df(6, **PRIORS)})
    table = load_particles(star)
    for name, values in PRIORS.items():
        np.testing.assert_array_equal(table.extra[name].to_numpy(np.float64), values)
    out = tmp_path / "run_data.star"
    write_particles(out, table, rlnAngleRot=np.zeros(6))  # a refinement's new angles; the priors stay
    written = read_star(out)["particles"]
    for name, values in PRIORS.items():
        np.testing.assert_allclose(written[name].to_numpy(np.float64), values)


def test_pixel_offset_priors_of_star_30_become_angstrom(star):
    df = particles_df(6, rlnOriginXPrior=[2.0, 0, 0, 0, 0, -1.0], rlnOriginYPrior=[0, 1.0, 0, 0, 0, 0])
    df = df.drop(columns=["rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"])
    for name, value in optics_df().iloc[0].items():
        if name not in ("rlnOpticsGroup", "rlnOpticsGroupName", "rlnImageSize", "rlnImageDimensionality"):
            df[name] = value
    write_star(star, {"": df})
    table = load_particles(star)
    np.testing.assert_allclose(table.extra["rlnOriginXPriorAngst"], [4.0, 0, 0, 0, 0, -2.0])  # 2 Å/px
    np.testing.assert_allclose(table.extra["rlnOriginYPriorAngst"], [0, 2.0, 0, 0, 0, 0])
    assert "rlnOriginXPrior" not in table.extra  # as RELION's converter: the Å column replaces it


@pytest.mark.parametrize(
    "column, value, words",
    [
        ("rlnAngleTiltPrior", "nan", "rlnAngleTiltPrior in data_particles row 3 is NaN"),
        ("rlnAnglePsiPrior", "400", "rlnAnglePsiPrior in data_particles row 3 is 400; it must be an angle in degrees"),
        ("rlnAngleRotPrior", "abc", "rlnAngleRotPrior in data_particles row 3 is 'abc', not a finite number"),
        ("rlnOriginXPriorAngst", "1e9", "rlnOriginXPriorAngst in data_particles row 3 is 1e+09; it must be an origin"),
    ],
)
def test_bad_priors_name_file_column_and_row(star, column, value, words):
    df = particles_df(6, **PRIORS).astype(object)
    df.loc[2, column] = value
    write_star(star, {"optics": optics_df(), "particles": df})
    with pytest.raises(CryoInputError) as info:
        load_particles(star)
    message = str(info.value)
    assert words in message and "particles.star" in message and "\n" not in message, message


def test_without_prior_columns_nothing_is_added(star):
    write_star(star, {"optics": optics_df(), "particles": particles_df(6)})
    table = load_particles(star)
    assert not any("Prior" in c for c in table.extra.columns)
    assert isinstance(table.extra, pd.DataFrame)
