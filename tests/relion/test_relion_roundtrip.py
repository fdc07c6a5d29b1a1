"""Round trips against Debian's RELION 3.1.3 binaries: our particles -> relion_reconstruct, relion_project -> ours.

These are the checks that Euler angles, origin offsets, CTF (with astigmatism) and the symmetry
axes agree with RELION's. Each positive check has a negative control that must fail it. Even boxes
only (RELION 3.1.3 is not self-consistent for odd boxes; see tests/reconstruction for those).
"""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryorefine.ctf import ctf_for_particles
from cryorefine.density import atoms_to_map, packaged_model, read_atoms, two_fold_axis_to_z
from cryorefine.fourier.grids import irfft2_centered, rfft2_centered, rfft_freqs_2d, shell_index_2d
from cryorefine.geometry.euler import euler_to_matrix, matrix_to_euler
from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles, write_particles
from cryorefine.io.table import read_images
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.reconstruction import from_particles
from cryorefine.reconstruction.from_particles import reconstruct_from_particles
from cryorefine.reconstruction.fsc import fsc_curve
from cryorefine.reconstruction.symmetrise import rotate_map, symmetrise_map
from cryorefine.simulate import particle_image_rfft, simulate_particles

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_project") is None or shutil.which("relion_reconstruct") is None,
        reason="RELION binaries not installed",
    ),
]

N_IMAGES = 24  # per-image comparisons


def relion(cwd, *args):
    """Run a RELION program in the particle folder (its project directory); raise with its output on failure."""
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def two_thirds_shell(box):
    return int(round(2 / 3 * (box // 2)))


def fsc_to_truth(map_path_or_tensor, truth):
    rec = (
        torch.from_numpy(read_map(map_path_or_tensor)[0])
        if not isinstance(map_path_or_tensor, torch.Tensor)
        else map_path_or_tensor
    )
    return fsc_curve(rec.double(), truth.double())


def min_fsc_to_two_thirds(f, box):
    return float(f[1 : two_thirds_shell(box) + 1].min())


def per_image_scores(ours, theirs, box):
    """Relative error ||a - b|| / ||b|| and the lowest FRC over shells 1 .. 2/3 Nyquist, per image."""
    rel = (ours - theirs).flatten(1).norm(dim=1) / theirs.flatten(1).norm(dim=1)
    fa, fb = rfft2_centered(ours).flatten(1), rfft2_centered(theirs).flatten(1)
    shells = shell_index_2d(box).flatten()
    k = two_thirds_shell(box)
    frc = []
    for s in range(1, k + 1):
        m = shells == s
        num = (fa[:, m] * fb[:, m].conj()).real.sum(1)
        den = torch.sqrt((fa[:, m].abs() ** 2).sum(1) * (fb[:, m].abs() ** 2).sum(1))
        frc.append(num / den)
    return rel, torch.stack(frc, 1).min(1).values


def passes(rel, frc):
    return (rel < 0.04) & (frc >= 0.99)


# ------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def asym(tmp_path_factory):
    """6msm at box 64, 3 Å/px: 400 noise-free particles with astigmatism up to ±2000 Å and offsets up to 8 Å,
    plus relion_project's images for the same STAR rows with and without CTF."""
    box, angpix = 64, 3.0
    d = tmp_path_factory.mktemp("relion_asym")
    truth = atoms_to_map(*read_atoms(packaged_model()), box, angpix)
    simulate_particles(truth, angpix, d, 400, snr=0, astigmatism_angst=4000.0, max_shift_angst=8.0, seed=1)
    relion(d, "relion_project", "--i", "truth.mrc", "--ang", "particles.star", "--ctf", "--o", "rp")
    relion(d, "relion_project", "--i", "truth.mrc", "--ang", "particles.star", "--o", "rpn")
    truth = torch.from_numpy(read_map(d / "truth.mrc")[0]).double()
    return d, truth, box


def our_images(
    table, truth, idx, ctf=True, transpose=False, origin_sign=1.0, swap_defocus=False, extra_shift_px=(0.0, 0.0)
):
    """Our particle images (float64) for table rows ``idx``, with optional deliberate mistakes."""
    box = table.box
    ky, kx = rfft_freqs_2d(box, dtype=torch.float64)
    A = euler_to_matrix(table.rot_deg[idx], table.tilt_deg[idx], table.psi_deg[idx])
    if transpose:
        A = A.transpose(-1, -2)
    origin = torch.from_numpy(
        np.stack([table.origin_x_angst[idx], table.origin_y_angst[idx]], -1) / table.angpix[idx, None]
    )
    origin = origin_sign * origin - torch.tensor(extra_shift_px, dtype=torch.float64)
    c = None
    if ctf:
        if swap_defocus:
            table.defocus_u_angst, table.defocus_v_angst = table.defocus_v_angst, table.defocus_u_angst
        try:
            c = ctf_for_particles(table, idx, ky, kx, box, dtype=torch.float64)
        finally:
            if swap_defocus:
                table.defocus_u_angst, table.defocus_v_angst = table.defocus_v_angst, table.defocus_u_angst
    return irfft2_centered(particle_image_rfft(prepare_padded_transform(truth, 2), A, origin, c, box), box)


# ------------------------------------------------------------------ per image


@pytest.mark.parametrize("ctf", [True, False])
def test_projection_matches_relion_project(asym, ctf):
    d, truth, box = asym
    table = load_particles(d / "particles.star", project_dir=d)
    idx = np.arange(N_IMAGES)
    theirs = torch.from_numpy(
        read_images(load_particles(d / ("rp.star" if ctf else "rpn.star"), project_dir=d), idx)
    ).double()
    rel, frc = per_image_scores(our_images(table, truth, idx, ctf=ctf), theirs, box)
    print(f"ctf={ctf}: rel err max {rel.max():.4f} median {rel.median():.4f}; FRC min {frc.min():.5f}")
    assert bool(passes(rel, frc).all()), (rel, frc)


@pytest.mark.parametrize("mistake", ["origin_sign", "defocus_swap", "euler_transposed", "one_pixel_shift"])
def test_projection_negative_controls(asym, mistake):
    d, truth, box = asym
    table = load_particles(d / "particles.star", project_dir=d)
    rp = load_particles(d / "rp.star", project_dir=d)
    idx = np.arange(len(table))
    # keep rows where the mistake matters: offsets >= 1 px, |DefocusU - DefocusV| >= 1000 Å
    if mistake == "origin_sign":
        idx = idx[np.hypot(table.origin_x_angst, table.origin_y_angst) / table.angpix >= 1.0]
    if mistake == "defocus_swap":
        idx = idx[np.abs(table.defocus_u_angst - table.defocus_v_angst) >= 1000.0]
        idx = idx[np.abs(table.defocus_angle_deg[idx] % 90 - 45) > 5]  # away from 45° (a mirror would hide there)
    idx = idx[:N_IMAGES]
    assert len(idx) >= 10
    kwargs = {
        "origin_sign": dict(origin_sign=-1.0),
        "defocus_swap": dict(swap_defocus=True),
        "euler_transposed": dict(transpose=True),
        "one_pixel_shift": dict(extra_shift_px=(1.0, 0.0)),
    }[mistake]
    theirs = torch.from_numpy(read_images(rp, idx)).double()
    rel, frc = per_image_scores(our_images(table, truth, idx, **kwargs), theirs, box)
    print(f"{mistake}: rel err min {rel.min():.4f} median {rel.median():.4f}; FRC min median {frc.median():.4f}")
    assert not bool(passes(rel, frc).any()), (rel, frc)


# ------------------------------------------------------------------ round trips (C1)


def test_relion_reconstructs_our_particles(asym):
    d, truth, box = asym
    relion(d, "relion_reconstruct", "--i", "particles.star", "--o", "rr_ours.mrc", "--ctf")
    f = fsc_to_truth(d / "rr_ours.mrc", truth)
    print(f"relion_reconstruct(ours): min FSC to 2/3 Nyquist {min_fsc_to_two_thirds(f, box):.4f}")
    assert min_fsc_to_two_thirds(f, box) >= 0.9


def test_we_reconstruct_relion_projections(asym):
    d, truth, box = asym
    rec, angpix = reconstruct_from_particles(load_particles(d / "rp.star", project_dir=d), ctf=True)
    assert angpix == pytest.approx(3.0)
    f = fsc_to_truth(rec, truth)
    print(f"ours(relion_project): min FSC to 2/3 Nyquist {min_fsc_to_two_thirds(f, box):.4f}")
    assert min_fsc_to_two_thirds(f, box) >= 0.9
    # negative control: the same images with the origin offsets negated
    t = load_particles(d / "rp.star", project_dir=d)
    t.origin_x_angst, t.origin_y_angst = -t.origin_x_angst, -t.origin_y_angst
    bad = fsc_to_truth(reconstruct_from_particles(t, ctf=True)[0], truth)
    print(f"ours(relion_project, origins negated): min FSC {min_fsc_to_two_thirds(bad, box):.4f}")
    assert min_fsc_to_two_thirds(bad, box) < 0.5


# ------------------------------------------------------------------ symmetric round trips


def sym_truth(sym, box=48, angpix=1.5):
    """The 4E43 dimer with its 2-fold on z, symmetrised to C2 or D2 (D2's extra 2-fold on x)."""
    xyz, w = two_fold_axis_to_z(packaged_model("4E43.pdb"))
    return symmetrise_map(atoms_to_map(xyz, w, box, angpix, centre=False), sym)


@pytest.mark.parametrize("sym, n", [("C2", 50), ("D2", 30)])  # too few views for C1 alone
def test_symmetric_round_trip(tmp_path, sym, n, monkeypatch):
    box, angpix = 48, 1.5
    simulate_particles(
        sym_truth(sym, box, angpix), angpix, tmp_path, n, snr=0, astigmatism_angst=2000.0, max_shift_angst=4.0, seed=3
    )
    truth = torch.from_numpy(read_map(tmp_path / "truth.mrc")[0]).double()
    # RELION reconstructs our particles with --sym
    relion(tmp_path, "relion_reconstruct", "--i", "particles.star", "--o", "rr.mrc", "--ctf", "--sym", sym)
    f_relion = min_fsc_to_two_thirds(fsc_to_truth(tmp_path / "rr.mrc", truth), box)
    # we reconstruct relion_project's particles with sym
    relion(tmp_path, "relion_project", "--i", "truth.mrc", "--ang", "particles.star", "--ctf", "--o", "rp")
    rp = load_particles(tmp_path / "rp.star", project_dir=tmp_path)
    f_ours = min_fsc_to_two_thirds(fsc_to_truth(reconstruct_from_particles(rp, sym=sym)[0], truth), box)
    # the same without symmetry: fewer views, so the symmetry is what fills Fourier space
    f_c1 = min_fsc_to_two_thirds(fsc_to_truth(reconstruct_from_particles(rp, sym="C1")[0], truth), box)
    # negative control: poses S·A instead of RELION's A·S
    monkeypatch.setattr(
        from_particles, "expand_poses", lambda A, S: (S.unsqueeze(0) @ A.unsqueeze(1)).reshape(-1, 3, 3)
    )
    f_sa = min_fsc_to_two_thirds(fsc_to_truth(reconstruct_from_particles(rp, sym=sym)[0], truth), box)
    print(
        f"{sym}: relion_reconstruct --sym {f_relion:.4f}; ours sym {f_ours:.4f}; ours C1 {f_c1:.4f}; "
        f"ours S·A {f_sa:.4f}"
    )
    assert f_relion >= 0.9 and f_ours >= 0.9
    assert f_c1 < f_ours - 0.03
    assert f_sa < 0.8


def test_c2_on_the_wrong_axis_scores_lower(tmp_path):
    """The same C2 images described as views of the map turned 90° about y (its 2-fold now on x):
    relion_reconstruct --sym C2 (RELION's 2-fold on z) and ours must both score far lower than with the
    map's own axis on z. Pose of the turned map: A·Qᵀ (Q the turn), written back as Euler angles."""
    box, angpix = 48, 1.5
    simulate_particles(
        sym_truth("C2", box, angpix),
        angpix,
        tmp_path,
        100,
        snr=0,
        astigmatism_angst=2000.0,
        max_shift_angst=4.0,
        seed=4,
    )
    truth = torch.from_numpy(read_map(tmp_path / "truth.mrc")[0]).double()
    Q = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)  # 90° about y: z -> x
    truth_x = rotate_map(truth, Q)
    table = load_particles(tmp_path / "particles.star", project_dir=tmp_path)
    A = euler_to_matrix(*(np.array(a) for a in (table.rot_deg, table.tilt_deg, table.psi_deg))) @ Q.T
    rot, tilt, psi = (a.numpy() for a in matrix_to_euler(A))
    write_particles(tmp_path / "turned.star", table, rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    turned = load_particles(tmp_path / "turned.star", project_dir=tmp_path)
    ok_c1 = min_fsc_to_two_thirds(fsc_to_truth(reconstruct_from_particles(turned, sym="C1")[0], truth_x), box)
    relion(tmp_path, "relion_reconstruct", "--i", "turned.star", "--o", "rr_wrong.mrc", "--ctf", "--sym", "C2")
    f_relion = fsc_to_truth(tmp_path / "rr_wrong.mrc", truth_x)
    f_ours = fsc_to_truth(reconstruct_from_particles(turned, sym="C2")[0], truth_x)
    # and the operators conjugated onto x (C2 about x) put it right again: the axis is all that was wrong
    ops_x = Q @ symmetry_matrices("C2") @ Q.T
    f_fixed = min_fsc_to_two_thirds(fsc_to_truth(reconstruct_from_particles(turned, sym=ops_x)[0], truth_x), box)
    print(
        f"C2 axis on x: ours C1 {ok_c1:.4f}; relion --sym C2 {min_fsc_to_two_thirds(f_relion, box):.4f}; "
        f"ours C2 {min_fsc_to_two_thirds(f_ours, box):.4f}; ours C2 about x {f_fixed:.4f}"
    )
    assert ok_c1 >= 0.9 and f_fixed >= 0.9
    assert min_fsc_to_two_thirds(f_relion, box) < 0.8 and min_fsc_to_two_thirds(f_ours, box) < 0.8
    assert (
        fsc_curve(read_map_tensor(tmp_path / "rr_wrong.mrc"), reconstruct_from_particles(turned, sym="C2")[0].double())[
            1:17
        ].min()
        > 0.9
    )


def read_map_tensor(path):
    return torch.from_numpy(read_map(path)[0]).double()
