import os

import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import CryoInputError
from cryorefine.io.star import read_star, write_star, write_star_table


def test_round_trip_single_and_multi_block(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["000001@a.mrcs", "000002@a.mrcs"], "rlnAngleRot": [10.5, -3.25],
                       "rlnClassNumber": [1, 2]})
    path = tmp_path / "one.star"
    write_star(path, {"particles": df})
    blocks = read_star(path)
    assert list(blocks) == ["particles"]
    out = blocks["particles"]
    assert list(out.columns) == ["rlnImageName", "rlnAngleRot", "rlnClassNumber"]
    assert list(out["rlnImageName"]) == list(df["rlnImageName"])
    np.testing.assert_allclose(out["rlnAngleRot"], df["rlnAngleRot"])
    assert "_rlnImageName" in path.read_text()

    write_star(path, {"optics": pd.DataFrame({"rlnOpticsGroup": [1]}), "particles": df})
    assert list(read_star(path)) == ["optics", "particles"]
    assert sorted(os.listdir(tmp_path)) == ["one.star"]


def test_general_key_value_block(tmp_path):
    path = tmp_path / "model.star"
    write_star_table(path, {"model_general": {"rlnReferenceDimensionality": 3,
                                              "rlnCurrentResolution": np.float64(7.5),
                                              "rlnReferenceSigma2": "x"},
                            "model_classes": pd.DataFrame({"rlnReferenceImage": ["a.mrc"]})})
    text = path.read_text()
    general = text.split("data_model_general")[1].split("data_model_classes")[0]
    assert "loop_" not in general and "_rlnCurrentResolution" in general
    blocks = read_star(path)
    assert isinstance(blocks["model_general"], pd.DataFrame) and len(blocks["model_general"]) == 1
    assert blocks["model_general"]["rlnCurrentResolution"].iloc[0] == pytest.approx(7.5)
    assert blocks["model_general"]["rlnReferenceDimensionality"].iloc[0] == 3


def test_read_errors(tmp_path):
    with pytest.raises(CryoInputError, match="not found") as info:
        read_star(tmp_path / "missing.star")
    assert "missing.star" in str(info.value)
    (tmp_path / "empty.star").write_text("")
    with pytest.raises(CryoInputError, match="empty"):
        read_star(tmp_path / "empty.star")
    (tmp_path / "junk.star").write_text("this is not a star file\n")
    with pytest.raises(CryoInputError, match="junk.star"):
        read_star(tmp_path / "junk.star")
    (tmp_path / "bad.star").write_text("data_\nloop_\n_rlnA #1\n_rlnB #2\n1 2 3\n")
    with pytest.raises(CryoInputError, match="malformed") as info:
        read_star(tmp_path / "bad.star")
    assert "bad.star" in str(info.value)
