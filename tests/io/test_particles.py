import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import CryoInputError
from cryorefine.io.mrc import write_stack
from cryorefine.io.particles import load_particles, particle_blocks, write_particles
from cryorefine.io.table import read_images
from cryorefine.io.star import read_star, write_star

BOX = 8


def make_stack(path, n, box=BOX, seed=0, dtype=np.float32):
    data = np.random.default_rng(seed).normal(size=(n, box, box)).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == np.float32:
        write_stack(path, data, 2.0)
    else:
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
    return data.astype(np.float32)


def optics_df(**over):
    row = {
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnOpticsGroup": 1,
        "rlnImagePixelSize": 2.0,
        "rlnImageSize": BOX,
        "rlnImageDimensionality": 2,
        "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1,
    }
    row.update(over)
    return pd.DataFrame([{k: v for k, v in row.items() if v is not None}])


def particles_df(n, stack="Particles/stack.mrcs", **extra):
    rng = np.random.default_rng(5)
    df = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": rng.normal(size=n),
            "rlnOriginYAngst": rng.normal(size=n),
            "rlnDefocusU": rng.uniform(1e4, 2e4, n),
            "rlnDefocusV": rng.uniform(1e4, 2e4, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnOpticsGroup": np.ones(n, int),
            "rlnMicrographName": [f"mic{i % 3}.mrc" for i in range(n)],
        }
    )
    for k, v in extra.items():
        df[k] = v
    return df


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION-like project: Particles/stack.mrcs, job/particles.star, cwd = project."""
    images = make_stack(tmp_path / "Particles" / "stack.mrcs", 6)
    (tmp_path / "job").mkdir()
    star = tmp_path / "job" / "particles.star"
    write_star(star, {"optics": optics_df(), "particles": particles_df(6)})
    monkeypatch.chdir(tmp_path)
    return tmp_path, star, images


def test_load_31_and_round_trip(project, tmp_path):
    root, star, images = project
    table = load_particles(star)
    assert len(table) == 6 and table.has_ctf and table.box == BOX
    assert table.image_index.tolist() == list(range(6))
    assert set(table.image_stack) == {str(root / "Particles" / "stack.mrcs")}
    np.testing.assert_allclose(table.angpix, 2.0)
    assert table.optics[0].voltage_kv == 300 and table.optics[0].name == "opticsGroup1"
    assert table.optics_group.tolist() == [0] * 6 and table.class_number.tolist() == [1] * 6
    assert list(table.extra.columns) == ["rlnMicrographName"]
    np.testing.assert_array_equal(read_images(table, [5, 0, 3]), images[[5, 0, 3]])

    out = root / "job" / "out.star"
    new_psi = np.arange(6, dtype=float)
    write_particles(out, table, rlnAnglePsi=new_psi, rlnLogLikeliContribution=np.ones(6))
    again = load_particles(out)
    for name in ("rot_deg", "tilt_deg", "origin_x_angst", "defocus_u_angst", "defocus_angle_deg"):
        np.testing.assert_allclose(getattr(again, name), getattr(table, name), atol=1e-5)
    np.testing.assert_allclose(again.psi_deg, new_psi)
    assert list(again.image_name) == list(table.image_name)
    assert "rlnLogLikeliContribution" in again.extra and "rlnMicrographName" in again.extra
    assert read_star(out)["optics"]["rlnImageDimensionality"].iloc[0] == 2

    sub = table.subset(table.image_index % 2 == 0)
    assert len(sub) == 3 and sub.extra.shape == (3, 1)
    np.testing.assert_array_equal(read_images(sub, [1]), images[[2]])
    assert len(table.subset([4, 1])) == 2


def test_image_names_are_written_relative_to_the_directory_of_each_write(project, monkeypatch):
    """The names are made once per table and directory (every iteration writes them): another directory, or a table
    with other names (a subset, dataclasses.replace), gets its own."""
    root, star, _ = project
    table = load_particles(star)
    names = lambda: list(particle_blocks(table)["particles"]["rlnImageName"])  # noqa: E731
    assert names() == [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(6)]
    monkeypatch.chdir(root / "job")
    assert names() == [f"{i + 1:06d}@{root}/Particles/stack.mrcs" for i in range(6)]
    monkeypatch.chdir(root)
    assert names()[0] == "000001@Particles/stack.mrcs"
    table = table.subset([4, 1])
    assert names() == ["000005@Particles/stack.mrcs", "000002@Particles/stack.mrcs"]


def test_load_30_pixel_size_and_origin_in_pixels(tmp_path, monkeypatch):
    make_stack(tmp_path / "Particles" / "s.mrcs", 4)
    df = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1}@Particles/s.mrcs" for i in range(4)],
            "rlnDetectorPixelSize": 14.0,
            "rlnMagnification": 50000.0,
            "rlnVoltage": [300.0, 300.0, 200.0, 300.0],
            "rlnSphericalAberration": 2.7,
            "rlnAmplitudeContrast": 0.1,
            "rlnOriginX": [2.0, 0, 0, 1],
            "rlnOriginY": [0, -1.0, 0, 0],
            "rlnDefocusU": 15000.0,
            "rlnDefocusV": 14000.0,
            "rlnDefocusAngle": 10.0,
        }
    )
    star = tmp_path / "p30.star"
    write_star(star, {"": df})
    monkeypatch.chdir(tmp_path)
    table = load_particles(star)
    np.testing.assert_allclose(table.angpix, 2.8)
    np.testing.assert_allclose(table.origin_x_angst, [5.6, 0, 0, 2.8])
    np.testing.assert_allclose(table.origin_y_angst, [0, -2.8, 0, 0])
    assert [g.voltage_kv for g in table.optics] == [300, 200]
    assert table.optics_group.tolist() == [0, 0, 1, 0]
    assert table.box == BOX  # from the stack header
    blocks = particle_blocks(table)
    assert blocks["optics"]["rlnOpticsGroup"].tolist() == [1, 2]
    assert "rlnVoltage" not in blocks["particles"] and "rlnOriginXAngst" in blocks["particles"]


def test_cryosparc_style_31_without_name_and_size(tmp_path):
    make_stack(tmp_path / "J1" / "stack.mrc", 3)
    opt = optics_df(rlnOpticsGroupName=None, rlnImageSize=None, rlnImageDimensionality=None)
    df = pd.DataFrame({"rlnImageName": ["000001@J1/stack.mrc", "000003@J1/stack.mrc"], "rlnOpticsGroup": [1, 1]})
    star = tmp_path / "cs.star"
    write_star(star, {"optics": opt, "particles": df})
    table = load_particles(star, project_dir=tmp_path / "elsewhere")  # falls back to the STAR folder
    assert table.box == BOX and table.optics[0].name == "opticsGroup1" and not table.has_ctf
    assert table.image_index.tolist() == [0, 2]
    np.testing.assert_allclose(table.ctf_scale, 1.0)


def test_path_resolution(tmp_path):
    proj, other = tmp_path / "proj", tmp_path / "other"
    make_stack(proj / "Particles" / "a.mrcs", 2, seed=1)
    make_stack(other / "Particles" / "a.mrcs", 2, seed=2)
    star = other / "p.star"
    write_star(star, {"optics": optics_df(), "particles": particles_df(2, stack="Particles/a.mrcs")})
    assert load_particles(star, project_dir=proj).image_stack[0] == str(proj / "Particles" / "a.mrcs")
    assert load_particles(star, project_dir=tmp_path).image_stack[0] == str(other / "Particles" / "a.mrcs")
    shutil.rmtree(other / "Particles")
    with pytest.raises(CryoInputError) as info:
        load_particles(star, project_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "Particles" / "a.mrcs") in msg and str(other / "Particles" / "a.mrcs") in msg


def test_single_image_files(tmp_path):
    for i in range(2):
        with mrcfile.new(tmp_path / f"img{i}.mrc") as mrc:
            mrc.set_data(np.full((BOX, BOX), i, np.float32))
    star = tmp_path / "p.star"
    write_star(star, {"optics": optics_df(), "particles": pd.DataFrame({"rlnImageName": ["img1.mrc", "img0.mrc"]})})
    table = load_particles(star)
    assert table.image_index.tolist() == [0, 0]
    np.testing.assert_array_equal(read_images(table, [0, 1])[:, 0, 0], [1, 0])


def test_index_past_end(project):
    root, star, _ = project
    write_star(star, {"optics": optics_df(), "particles": particles_df(7)})
    table = load_particles(star)
    read_images(table, [0, 5])
    with pytest.raises(CryoInputError, match=r"image 7 .*holds 6 images") as info:
        read_images(table, [6])
    assert "stack.mrcs" in str(info.value)


def test_missing_stack_file(project):
    root, star, _ = project
    (root / "Particles" / "stack.mrcs").unlink()
    with pytest.raises(CryoInputError, match="not found"):
        load_particles(star)


@pytest.mark.parametrize(
    "block,column",
    [
        ("particles", "rlnImageName"),
        ("optics", "rlnVoltage"),
        ("optics", "rlnImagePixelSize"),
        ("optics", "rlnOpticsGroup"),
    ],
)
def test_missing_required_column(project, block, column):
    root, star, _ = project
    blocks = {"optics": optics_df(), "particles": particles_df(6)}
    blocks[block] = blocks[block].drop(columns=[column])
    write_star(star, blocks)
    with pytest.raises(CryoInputError, match=column) as info:
        load_particles(star)
    assert "particles.star" in str(info.value)


def test_empty_tables(project):
    root, star, _ = project
    write_star(star, {"optics": optics_df(), "particles": particles_df(0)})
    with pytest.raises(CryoInputError, match="no particles"):
        load_particles(star)
    star.write_text("")
    with pytest.raises(CryoInputError, match="empty"):
        load_particles(star)


def test_nan_pixels(project):
    root, star, images = project
    images[2, 1, 1] = np.nan
    with pytest.warns(RuntimeWarning):
        write_stack(root / "Particles" / "stack.mrcs", images, 2.0)
    table = load_particles(star)
    read_images(table, [0, 1])
    with pytest.raises(CryoInputError, match="NaN") as info:
        read_images(table, [1, 2])
    assert "stack.mrcs" in str(info.value)


def test_non_square_stack(project):
    root, star, _ = project
    with mrcfile.new(root / "Particles" / "stack.mrcs", overwrite=True) as mrc:
        mrc.set_data(np.zeros((6, BOX, BOX + 2), np.float32))
    table = load_particles(star)
    with pytest.raises(CryoInputError, match="not square"):
        read_images(table, [0])


def test_float16_stack(project):
    root, star, _ = project
    images = make_stack(root / "Particles" / "stack.mrcs", 6, dtype=np.float16)
    with mrcfile.open(root / "Particles" / "stack.mrcs", header_only=True) as mrc:
        assert mrc.header.mode == 12
    table = load_particles(star)
    out = read_images(table, [3, 1])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, images[[3, 1]])


def test_many_stacks_grouped_reads(tmp_path):
    stacks = [make_stack(tmp_path / f"s{k}.mrcs", 3, seed=k) for k in range(3)]
    names = [f"{i + 1}@s{k}.mrcs" for k in range(3) for i in range(3)]
    star = tmp_path / "p.star"
    write_star(star, {"optics": optics_df(), "particles": pd.DataFrame({"rlnImageName": names})})
    table = load_particles(star)
    order = np.array([8, 0, 4, 3, 7])
    expected = np.concatenate(stacks)[order]
    np.testing.assert_array_equal(read_images(table, order), expected)
    assert len(table._stacks) == 3


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_stack_create") is None, reason="RELION not installed")
def test_relion_reads_our_files(project, tmp_path):
    root, star, images = project
    table = load_particles(star)
    out_star = root / "ours.star"
    write_particles(out_star, table)
    result = subprocess.run(
        ["relion_stack_create", "--i", str(out_star), "--o", str(root / "relion_out")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with mrcfile.open(root / "relion_out.mrcs") as mrc:
        np.testing.assert_allclose(mrc.data, images, atol=1e-5)
    again = load_particles(root / "relion_out.star")
    assert len(again) == 6
    np.testing.assert_allclose(again.rot_deg, table.rot_deg, atol=1e-4)


@pytest.mark.parametrize(
    "block, column, value, words",
    [
        ("particles", "rlnDefocusU", "abc", "rlnDefocusU in data_particles row 3 is 'abc', not a finite number"),
        ("particles", "rlnAngleRot", "inf", "rlnAngleRot in data_particles row 3 is inf"),
        ("particles", "rlnOpticsGroup", "1.5", "rlnOpticsGroup in data_particles row 3 is 1.5, not a whole number"),
        ("optics", "rlnAmplitudeContrast", "1.5", "rlnAmplitudeContrast in data_optics row 1 is 1.5; it must be"),
        ("optics", "rlnImagePixelSize", "0", "rlnImagePixelSize in data_optics row 1 is 0; it must be the pixel"),
        ("optics", "rlnImageSize", "-8", "rlnImageSize in data_optics row 1 is -8; it must be the image size"),
    ],
)
def test_bad_numbers_name_column_and_row(project, block, column, value, words):
    root, star, _ = project
    blocks = {"optics": optics_df().astype(object), "particles": particles_df(6).astype(object)}
    blocks[block].loc[min(2, len(blocks[block]) - 1), column] = value
    write_star(star, blocks)
    with pytest.raises(CryoInputError) as info:
        load_particles(star)
    assert words in str(info.value) and "particles.star" in str(info.value)


def test_large_optics_group_number(project):
    """Group numbers are looked up, not used as indices (10^12 once asked for a 7 TiB table)."""
    root, star, _ = project
    write_star(star, {"optics": optics_df(rlnOpticsGroup=10**12), "particles": particles_df(6, rlnOpticsGroup=10**12)})
    table = load_particles(star)
    assert table.optics[0].number == 10**12 and (table.optics_group == 0).all()


def test_optics_aberrations_are_read(project):
    """The columns CtfRefine writes (RELION's formats: vectors as [c0,c1,...]) into each group's fields."""
    root, star, _ = project
    optics = optics_df(rlnBeamTiltX=0.9, rlnBeamTiltY=-1.2, rlnOddZernike="[0.1,-0.2]", rlnEvenZernike="[0,1e-3,2]",
                       rlnMagMat00=1.01, rlnMagMat01=0.002, rlnMagMat10=-0.001, rlnMagMat11=0.99)  # fmt: skip
    write_star(star, {"optics": optics, "particles": particles_df(6)})
    g = load_particles(star).optics[0]
    assert g.beam_tilt_mrad == (0.9, -1.2) and g.odd_zernike == (0.1, -0.2) and g.even_zernike == (0.0, 1e-3, 2.0)
    assert g.mag == (1.01, 0.002, -0.001, 0.99) and not g.ctf_premultiplied
    assert load_particles(star).optics[0].extra["rlnBeamTiltX"] == 0.9  # written back as it came


@pytest.mark.parametrize(
    "column, value, words",
    [
        ("rlnBeamTiltX", "1000", "rlnBeamTiltX in data_optics row 1 is 1000; it must be the beam tilt in mrad"),
        ("rlnBeamTiltY", "nan", "rlnBeamTiltY in data_optics row 1 is NaN or missing"),
        ("rlnOddZernike", "[0.1,nan]", "rlnOddZernike in data_optics row 1 is '[0.1,nan]'; it must be RELION's list"),
        ("rlnEvenZernike", "0.1 0.2", "rlnEvenZernike in data_optics row 1 is '0.1 0.2'; it must be RELION's list"),
        ("rlnMagMat00", "0", "determinant of the magnification matrix; it must lie in 0.5..2 (a singular matrix"),
        ("rlnCtfDataAreCtfPremultiplied", "2", "rlnCtfDataAreCtfPremultiplied in data_optics row 1 is 2; it must be"),
    ],
)
def test_bad_optics_aberrations_name_column_and_fix(project, column, value, words):
    root, star, _ = project
    mag = {"rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0}
    optics = optics_df(**mag).astype(object)
    optics.loc[0, column] = value
    write_star(star, {"optics": optics, "particles": particles_df(6)})
    with pytest.raises(CryoInputError) as info:
        load_particles(star)
    assert words in str(info.value) and "particles.star" in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_half_a_magnification_matrix_and_per_particle_beam_tilt_are_refused(project):
    root, star, _ = project
    write_star(star, {"optics": optics_df(rlnMagMat00=1.01), "particles": particles_df(6)})
    with pytest.raises(CryoInputError, match="but not rlnMagMat01, rlnMagMat10, rlnMagMat11"):
        load_particles(star)
    write_star(star, {"optics": optics_df(), "particles": particles_df(6, rlnBeamTiltX=0.5)})
    with pytest.raises(CryoInputError, match="per particle .RELION 3.0.*relion_convert_star"):
        load_particles(star)
