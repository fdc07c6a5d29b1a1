"""cryoSPARC .cs input and `cryorefine convert`: poses, shifts, CTF, optics groups and images against a simulation
whose RELION poses are known; the cryoSPARC fields are written independently with scipy (tests/cs_project.py)."""

import os
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from cs_project import make_cs_project, read_simulation, write_cs
from scipy.spatial.transform import Rotation

from cryorefine.cli.main import main
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.errors import CryoInputError
from cryorefine.io.cryosparc import pose_to_euler_deg
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.reconstruction.from_particles import reconstruct_from_particles
from cryorefine.reconstruction.fsc import fsc_curve
from cryorefine.simulate import simulate_particles

BOX, ANGPIX, N = 48, 4.0, 300


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("cs_sim")
    truth = atoms_to_map(*read_atoms(packaged_model()), BOX, ANGPIX)
    simulate_particles(truth, ANGPIX, d, N, snr=0, astigmatism_angst=2000.0, max_shift_angst=8.0, seed=4)
    return d


@pytest.fixture
def project(sim, tmp_path, monkeypatch):
    """The cryoSPARC project in tmp/P1, run from tmp (so stacks are found beside the .cs, not in the directory)."""
    monkeypatch.chdir(tmp_path)
    cs_path, order = make_cs_project(sim, tmp_path / "P1")
    parts, optics, images = read_simulation(sim)
    return cs_path, parts.iloc[order].reset_index(drop=True), optics, images[order]


def rotation_error_deg(rot, tilt, psi, truth):
    """Angle between the rotations of two ZYZ Euler sets (degrees), computed by scipy."""
    ours = Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], 1), degrees=True)
    ref = Rotation.from_euler("ZYZ", truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), degrees=True)
    return np.rad2deg((ours * ref.inv()).magnitude())


def test_pose_to_euler_is_the_transpose_of_the_axis_angle_rotation():
    poses = np.concatenate([Rotation.random(200, random_state=1).as_rotvec(), [[0, 0, 0], [np.pi, 0, 0], [0, 0, 0.3]]])
    rot, tilt, psi = pose_to_euler_deg(poses)
    # scipy's ZYZ intrinsic rotation of RELION's angles is Aᵀ, and A = R(pose)ᵀ, so it must be R(pose) itself
    err = (
        Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], 1), degrees=True) * Rotation.from_rotvec(poses).inv()
    ).magnitude()
    assert np.rad2deg(err).max() < 1e-9
    assert ((tilt >= 0) & (tilt <= 180)).all()


def test_cs_particles_match_the_truth(project):
    cs_path, truth, optics, images = project
    table = load_particles(cs_path)
    assert len(table) == N
    assert rotation_error_deg(table.rot_deg, table.tilt_deg, table.psi_deg, truth).max() < 1e-3
    np.testing.assert_allclose(table.origin_x_angst, truth["rlnOriginXAngst"], atol=1e-4)
    np.testing.assert_allclose(table.origin_y_angst, truth["rlnOriginYAngst"], atol=1e-4)
    np.testing.assert_allclose(table.defocus_u_angst, truth["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(table.defocus_v_angst, truth["rlnDefocusV"], rtol=1e-6)
    np.testing.assert_allclose(table.defocus_angle_deg, truth["rlnDefocusAngle"], atol=1e-4)
    np.testing.assert_array_equal(table.random_subset, truth["rlnRandomSubset"])
    assert [g.name for g in table.optics] == ["exp_group1", "exp_group3"]
    np.testing.assert_array_equal(table.optics_group, np.arange(N) % 2)
    for g in table.optics:
        assert (g.box, g.angpix, g.voltage_kv) == (BOX, ANGPIX, float(optics["rlnVoltage"]))
        assert g.cs_mm == pytest.approx(optics["rlnSphericalAberration"]) and g.amplitude_contrast == pytest.approx(
            optics["rlnAmplitudeContrast"]
        )
    np.testing.assert_array_equal(read_images(table, np.arange(N)), images)


def test_cs_prefix_and_object_strings(sim, tmp_path, monkeypatch):
    """cryoSPARC's '>' path prefix is dropped; paths stored as Python bytes objects are read too."""
    monkeypatch.chdir(tmp_path)
    cs_path, order = make_cs_project(sim, tmp_path / "P1", path_prefix=">", object_paths=True)
    table = load_particles(cs_path)
    assert table.image_stack[0] == str(tmp_path / "P1" / "J7" / "extract" / "stack_0.mrc")
    np.testing.assert_array_equal(read_images(table, [0, 1]), read_simulation(sim)[2][order[:2]])


@pytest.mark.parametrize("copy", [False, True])
def test_convert_writes_a_relion_star_file(project, tmp_path, capsys, copy):
    cs_path, truth, optics, images = project
    assert main(["convert", str(cs_path), "Import/particles.star"] + (["--copy"] if copy else [])) == 0
    blocks = starfile.read(tmp_path / "Import" / "particles.star", always_dict=True)
    o, p = blocks["optics"], blocks["particles"]
    assert o["rlnOpticsGroup"].tolist() == [1, 2] and o["rlnImageSize"].tolist() == [BOX, BOX]
    np.testing.assert_allclose(o["rlnImagePixelSize"], ANGPIX)
    np.testing.assert_allclose(o["rlnVoltage"], optics["rlnVoltage"])
    np.testing.assert_allclose(o["rlnSphericalAberration"], optics["rlnSphericalAberration"], rtol=1e-6)
    np.testing.assert_allclose(o["rlnAmplitudeContrast"], optics["rlnAmplitudeContrast"], rtol=1e-6)
    assert rotation_error_deg(p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"], truth).max() < 1e-3
    for col in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusAngle"):
        np.testing.assert_allclose(p[col], truth[col], atol=1e-3)
    for col in ("rlnDefocusU", "rlnDefocusV"):
        np.testing.assert_allclose(p[col], truth[col], rtol=1e-6)
    np.testing.assert_allclose(p["rlnPhaseShift"], 0.0)
    np.testing.assert_array_equal(p["rlnOpticsGroup"], np.arange(N) % 2 + 1)
    np.testing.assert_array_equal(p["rlnRandomSubset"], truth["rlnRandomSubset"])
    # rlnImageName: 1-based index into .mrcs links (copies) relative to the project directory (here tmp_path)
    index, stack = zip(*(name.split("@") for name in p["rlnImageName"]))
    assert set(stack) == {
        "Import/particles_stacks/P1_J7_extract_stack_0.mrcs",
        "Import/particles_stacks/P1_J7_extract_stack_1.mrcs",
    }
    for s in set(stack):
        assert os.path.islink(s) != copy
        with mrcfile.open(s) as m:
            data = np.array(m.data)
        rows = [r for r in range(N) if stack[r] == s]
        np.testing.assert_array_equal(data[[int(index[r]) - 1 for r in rows]], images[rows])


def fsc_min_to_two_thirds(rec, truth):
    f = fsc_curve(rec.double().cpu(), truth.double())
    return float(f[1 : int(round(2 / 3 * (BOX // 2))) + 1].min())


def test_reconstruct_from_cs_and_a_wrong_convention_fails(project, sim, tmp_path, capsys):
    """Our reconstruction from the .cs matches the truth; read with the pose not transposed, it does not."""
    cs_path, truth, optics, images = project
    truth_map = torch.from_numpy(read_map(sim / "truth.mrc")[0])
    assert main(["reconstruct", "--i", str(cs_path), "--o", "rec.mrc", "--ctf"]) == 0
    good = fsc_min_to_two_thirds(torch.from_numpy(read_map("rec.mrc")[0]), truth_map)
    cs = np.load(cs_path)
    cs["alignments3D/pose"] *= -1  # R(-pose) = R(pose)ᵀ: the other convention
    write_cs(cs_path, {name: cs[name] for name in cs.dtype.names})
    bad = fsc_min_to_two_thirds(reconstruct_from_particles(load_particles(cs_path), ctf=True)[0], truth_map)
    print(f"min FSC to 2/3 Nyquist: {good:.4f}; pose not transposed: {bad:.4f}")
    assert good >= 0.9 and bad < 0.5


def relion(*args):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)  # in the project directory (cwd)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


@pytest.mark.relion
@pytest.mark.skipif(
    not (shutil.which("relion_stack_create") and shutil.which("relion_reconstruct")),
    reason="RELION binaries not installed",
)
def test_relion_reads_the_converted_star_file(project, sim, tmp_path, capsys):
    """relion_stack_create gives back the particles' images in order; relion_reconstruct gives the truth map."""
    cs_path, truth, optics, images = project
    assert main(["convert", str(cs_path), "particles.star"]) == 0
    relion("relion_stack_create", "--i", "particles.star", "--o", "restacked")
    with mrcfile.open("restacked.mrcs") as m:
        np.testing.assert_allclose(np.array(m.data), images, atol=1e-6 * np.abs(images).max())
    relion("relion_reconstruct", "--i", "particles.star", "--o", "relion_rec.mrc", "--ctf")
    f = fsc_min_to_two_thirds(
        torch.from_numpy(read_map("relion_rec.mrc")[0]), torch.from_numpy(read_map(sim / "truth.mrc")[0])
    )
    print(f"relion_reconstruct of the converted STAR: min FSC to 2/3 Nyquist {f:.4f}")
    assert f >= 0.9


def test_cs_without_alignments_gives_identity_poses(project):
    """Particles straight from extraction have no alignments3D fields: identity pose, no shift, no half sets."""
    cs_path = project[0]
    cs = np.load(cs_path)
    write_cs(cs_path, {name: cs[name] for name in cs.dtype.names if not name.startswith("alignments3D/")})
    table = load_particles(cs_path)
    for values in (
        table.rot_deg,
        table.tilt_deg,
        table.psi_deg,
        table.origin_x_angst,
        table.origin_y_angst,
        table.random_subset,
    ):
        np.testing.assert_array_equal(np.abs(values), 0)


def _tiny_cs_fields(n=2) -> dict:
    return {
        "blob/path": np.array([b"J7/extract/stack_0.mrc"] * n, "S64"),
        "blob/idx": np.arange(n, dtype=np.uint32),
        "blob/shape": np.full((n, 2), 8, np.uint32),
        "blob/psize_A": np.full(n, 2.0, np.float32),
        "ctf/accel_kv": np.full(n, 300.0, np.float32),
        "ctf/cs_mm": np.full(n, 2.7, np.float32),
        "ctf/amp_contrast": np.full(n, 0.1, np.float32),
        "alignments3D/pose": np.zeros((n, 3), np.float32),
    }


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("alignments3D/pose", np.zeros(2, np.float32), "field alignments3D/pose holds float32 values of shape ()"),
        ("blob/psize_A", np.array([b"2.0"] * 2), "field blob/psize_A holds |S3 values"),
        ("blob/idx", np.array([0, 2**63], np.uint64), "field blob/idx of row 2 is 9223372036854775808; it must be"),
        ("ctf/amp_contrast", np.array([0.1, 1.5], np.float32), "field ctf/amp_contrast of row 2 is 1.5; it must be"),
        ("blob/path", np.array([b"J7/st\xffck.mrc"] * 2, "S16"), "field blob/path of row 1 is not UTF-8 text"),
    ],
)
def test_cs_fields_of_the_wrong_type_or_range(tmp_path, name, value, words):
    fields = _tiny_cs_fields()
    fields[name] = value
    write_cs(tmp_path / "p.cs", fields)
    with pytest.raises(CryoInputError) as info:
        load_particles(tmp_path / "p.cs")
    assert words in str(info.value) and "p.cs" in str(info.value)
