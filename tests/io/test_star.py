import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import CryoInputError
from cryorefine.io.star import read_star, write_star, write_star_table


def test_round_trip_single_and_multi_block(tmp_path):
    df = pd.DataFrame(
        {"rlnImageName": ["000001@a.mrcs", "000002@a.mrcs"], "rlnAngleRot": [10.5, -3.25], "rlnClassNumber": [1, 2]}
    )
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
    write_star_table(
        path,
        {
            "model_general": {
                "rlnReferenceDimensionality": 3,
                "rlnCurrentResolution": np.float64(7.5),
                "rlnReferenceSigma2": "x",
            },
            "model_classes": pd.DataFrame({"rlnReferenceImage": ["a.mrc"]}),
        },
    )
    text = path.read_text()
    general = text.split("data_model_general")[1].split("data_model_classes")[0]
    assert "loop_" not in general and "_rlnCurrentResolution" in general
    blocks = read_star(path)
    assert isinstance(blocks["model_general"], pd.DataFrame) and len(blocks["model_general"]) == 1
    assert blocks["model_general"]["rlnCurrentResolution"].iloc[0] == pytest.approx(7.5)
    assert blocks["model_general"]["rlnReferenceDimensionality"].iloc[0] == 3


def test_values_keep_their_precision_and_types(tmp_path):
    # RELION's fixed 6 decimals where they hold the value; tiny (σ² of normalised images) and huge values keep 9 digits
    df = pd.DataFrame(
        {
            "rlnSigma2Noise": [3.2e-7, 1.5e-9],
            "rlnDefocusU": [12345.678901, 98765.4321],
            "rlnCoordinateX": [1.25e6, 3.0],
            "rlnMicrographName": ["mic 1.mrc", ""],
            "rlnFlag": [True, False],
        }
    )
    path = tmp_path / "t.star"
    write_star_table(path, {"t": df, "general": {"rlnHasConverged": True, "rlnSmall": 2.5e-8, "rlnName": "a b"}})
    out = read_star(path)
    t = out["t"]
    np.testing.assert_allclose(t["rlnSigma2Noise"], df["rlnSigma2Noise"], rtol=1e-8)
    np.testing.assert_allclose(t["rlnDefocusU"], df["rlnDefocusU"], atol=1e-6)
    np.testing.assert_allclose(t["rlnCoordinateX"], df["rlnCoordinateX"], rtol=1e-8)
    assert list(t["rlnMicrographName"].fillna("")) == ["mic 1.mrc", ""]  # quoted: white space, empty
    assert list(t["rlnFlag"]) == [1, 0]
    g = out["general"].iloc[0]
    assert g["rlnHasConverged"] == 1 and g["rlnSmall"] == pytest.approx(2.5e-8, rel=1e-8) and g["rlnName"] == "a b"


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
    with pytest.raises(CryoInputError, match="line 5 has 3 values but the loop of data_ has 2 labels") as info:
        read_star(tmp_path / "bad.star")
    assert "bad.star" in str(info.value)
    (tmp_path / "cut.star").write_text("data_optics\nloop_\n_rlnA #1\n1\n\ndata_particles\n")
    with pytest.raises(CryoInputError, match=r"data_particles \(line 6\) holds no loop_ or values"):
        read_star(tmp_path / "cut.star")


def test_read_after_a_failed_read_of_the_same_path(tmp_path, monkeypatch):
    """starfile reads through linecache, which a failed parse left holding the file's old lines."""
    monkeypatch.chdir(tmp_path)
    Path("p.star").write_text("data_\nloop_\n_rlnA #1\n_rlnB #2\n1 2 3\n")
    with pytest.raises(CryoInputError, match="line 5 has 3 values"):
        read_star("p.star")
    Path("p.star").write_text("data_\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n")
    assert read_star("p.star")[""].to_dict("records") == [{"rlnA": 1, "rlnB": 2}]


def test_duplicate_label_and_non_utf8_bytes(tmp_path):
    (tmp_path / "dup.star").write_text("data_particles\nloop_\n_rlnA #1\n_rlnA #2\n1 2\n")
    with pytest.raises(CryoInputError, match="column rlnA appears twice in data_particles"):
        read_star(tmp_path / "dup.star")
    (tmp_path / "latin1.star").write_bytes("data_particles\nloop_\n_rlnA #1\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(CryoInputError, match=r"latin1.star: line 4 holds bytes that are not UTF-8"):
        read_star(tmp_path / "latin1.star")


def test_a_table_given_for_several_blocks_is_written_in_each(tmp_path):
    """model.star's per-group σ² tables are one table per optics group, given for each of its groups: the text is that
    of separate copies (star_text formats the shared table's rows once)."""
    from cryorefine.io.star import star_text

    shared = pd.DataFrame({"rlnSpectralIndex": [0, 1, 2], "rlnSigma2Noise": [1.5, 2.25e-7, 3.0]})
    other = pd.DataFrame({"rlnSpectralIndex": [0, 1], "rlnSigma2Noise": [4.0, 5.0]})
    blocks = {"model_group_1": shared, "model_group_2": other, "model_group_3": shared}
    copies = {name: t.copy() for name, t in blocks.items()}
    assert star_text(blocks) == star_text(copies)
    write_star(tmp_path / "m.star", blocks)
    back = read_star(tmp_path / "m.star")
    assert list(back) == list(blocks)
    for name, t in blocks.items():
        np.testing.assert_allclose(back[name]["rlnSigma2Noise"], t["rlnSigma2Noise"])
