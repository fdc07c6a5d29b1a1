import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryorefine.errors import CryoInputError
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.healpix import (
    angular_step_deg,
    child_directions,
    child_psis,
    direction_angles_deg,
    directions_within,
    healpix_directions,
    make_sampling,
    max_pixrad,
    nest_to_xyf,
    next_random_perturbation,
    oversampled_eulers,
    perturb_eulers,
    psi_angles_deg,
    sampling_eulers,
    xyf_to_nest,
)
from cryorefine.geometry.symmetry import symmetry_matrices, symmetry_order

# Numbers of directions written by RELION 3.1.3 (relion_refine --healpix_order o --sym s, the
# data_sampling_directions table of run_it001_sampling.star) for orders 1, 2, 3.
# None: RELION keeps no direction (and then crashes).
RELION_COUNTS = {
    "C1": (48, 192, 768),
    "C2": (24, 96, 384),
    "C4": (12, 48, 192),
    "D2": (12, 48, 192),
    "D7": (3, 13, 53),
    "T": (3, 14, 59),
    "O": (1, 7, 32),
    "I": (None, 2, 11),
    "I1": (1, 3, 12),
    "I3": (None, 4, 12),
    "I4": (1, 2, 11),
}
# Full (rot, tilt) lists from the same RELION runs, in RELION's order.
RELION_D7_2 = [
    (67.5, 60.0),
    (78.75, 48.189685),
    (75.0, 35.659088),
    (67.5, 23.556464),
    (101.25, 48.189685),
    (105.0, 35.659088),
    (101.25, 90.0),
    (112.5, 80.405932),
    (78.75, 90.0),
    (90.0, 80.405932),
    (101.25, 70.528779),
    (78.75, 70.528779),
    (90.0, 60.0),
]
RELION_T_2 = [
    (146.25, 70.528779),
    (123.75, 70.528779),
    (135.0, 60.0),
    (146.25, 48.189685),
    (112.5, 60.0),
    (123.75, 48.189685),
    (101.25, 48.189685),
    (105.0, 35.659088),
    (135.0, 35.659088),
    (112.5, 23.556464),
    (135.0, 11.715852),
    (101.25, 90.0),
    (112.5, 80.405932),
    (101.25, 70.528779),
]
RELION_I3_3 = [
    (174.375, 48.189685),
    (173.571429, 41.858792),
    (160.714286, 41.858792),
    (172.5, 35.659088),
    (157.5, 35.659088),
    (171.0, 29.565561),
    (153.0, 29.565561),
    (168.75, 23.556464),
    (146.25, 23.556464),
    (165.0, 17.612439),
    (157.5, 11.715852),
    (180.0, 54.314665),
]


@pytest.mark.parametrize("order", range(6))
def test_directions_match_healpy_nest(order):
    healpy = pytest.importorskip("healpy")
    rot, tilt = healpix_directions(order)
    theta, phi = healpy.pix2ang(2**order, np.arange(12 * 4**order), nest=True)
    assert len(rot) == 12 * 4**order
    np.testing.assert_allclose(np.radians(tilt), theta, atol=1e-13)
    np.testing.assert_allclose(np.radians(rot) % (2 * np.pi), phi, atol=1e-13)
    assert rot.min() > -180 and rot.max() <= 180  # RELION's checkDirection range
    assert max_pixrad(order) == pytest.approx(healpy.max_pixrad(2**order), rel=1e-12)


def test_steps_and_psi():
    assert [angular_step_deg(o) for o in range(4)] == [60.0, 30.0, 15.0, 7.5]
    psi = psi_angles_deg(2)
    assert len(psi) == 24 and psi[0] == 0.0 and psi[1] == 15.0 and psi[-1] == 345.0
    assert len(psi_angles_deg(psi_step_deg=7.0)) == 52  # ceil(360/7), step becomes 360/52
    np.testing.assert_allclose(child_psis(np.array([0.0, 15.0]), 15.0), [[-3.75, 3.75], [11.25, 18.75]])


@pytest.mark.parametrize("sym", RELION_COUNTS)
def test_counts_match_relion(sym):
    for order, n in zip((1, 2, 3), RELION_COUNTS[sym]):
        if n is None:
            with pytest.raises(CryoInputError):
                make_sampling(order, sym)
        else:
            assert make_sampling(order, sym).n_directions == n


@pytest.mark.parametrize("sym,order,ref", [("D7", 2, RELION_D7_2), ("T", 2, RELION_T_2), ("I3", 3, RELION_I3_3)])
def test_directions_match_relion(sym, order, ref):
    s = make_sampling(order, sym)
    np.testing.assert_allclose(np.stack([s.rot_deg, s.tilt_deg], 1), np.array(ref), atol=1e-5)


@pytest.mark.parametrize("sym", ["C1", "C2", "C4", "D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
@pytest.mark.parametrize("order", [2, 3])
def test_asymmetric_unit_covers_sphere_once(sym, order):
    s = make_sampling(order, sym)
    n_full = 12 * 4**order
    G = symmetry_order(sym)
    assert abs(s.n_directions - n_full / G) <= 0.15 * n_full / G + 2
    # every direction of the full sphere is within one step of a symmetry image of a kept one;
    # RELION's plane-cut icosahedral units (which we reproduce exactly, see the RELION lists
    # above) leave holes of up to ~1.7 steps at these orders (I, I4), so allow 2 there
    rot, tilt = healpix_directions(order)
    ang = direction_angles_deg(rot, tilt, s.rot_deg, s.tilt_deg, symmetry_matrices(sym))
    limit = 2.0 if sym.startswith("I") else 1.0
    assert ang.min(1).max() <= limit * angular_step_deg(order)


def test_sampling_eulers_layout():
    s = make_sampling(1, "C2")
    e = sampling_eulers(s)
    assert e.shape == (s.n_directions * s.n_psi, 3) == (24 * 12, 3)
    i = 5 * s.n_psi + 7
    np.testing.assert_array_equal(e[i], [s.rot_deg[5], s.tilt_deg[5], s.psi_deg[7]])


def test_child_directions():
    p = np.array([[0, 17], [40, 191]])
    ipix, rot, tilt = child_directions(2, p)
    assert ipix.shape == rot.shape == (2, 2, 4)
    np.testing.assert_array_equal(ipix, 4 * p[..., None] + np.arange(4))  # NEST children, in order
    r3, t3 = healpix_directions(3)
    np.testing.assert_array_equal(rot, r3[ipix])
    np.testing.assert_array_equal(tilt, t3[ipix])
    ipix2, _, _ = child_directions(1, np.array([5]), oversampling=2)
    assert sorted(ipix2[0]) == list(range(80, 96))
    # children are close to their parent
    r2, t2 = healpix_directions(2)
    ang = direction_angles_deg(r2[p.ravel()], t2[p.ravel()], rot.reshape(-1), tilt.reshape(-1))
    assert (ang[np.arange(4)[:, None], np.arange(16).reshape(4, 4)] < angular_step_deg(2)).all()


def test_nest_bits_against_a_loop_over_bits():
    """x, y <-> NEST index (the shift-and-mask interleaving) against bit-by-bit interleaving, up to 29-bit coordinates
    (HEALPix order 29, the format's limit)."""
    rng = np.random.default_rng(0)
    for order in (0, 1, 8, 13, 29):
        x, y = rng.integers(0, 1 << order, size=(2, 500), endpoint=False) if order else np.zeros((2, 500), int)
        face = rng.integers(0, 12, size=500)
        spread = lambda v: sum(((int(v) >> k) & 1) << (2 * k) for k in range(order))  # noqa: E731
        ref = [(int(f) << (2 * order)) + spread(a) + (spread(b) << 1) for a, b, f in zip(x, y, face)]
        ipix = xyf_to_nest(order, x, y, face)
        assert ipix.tolist() == ref
        back = nest_to_xyf(order, ipix)
        assert all(np.array_equal(u, v) for u, v in zip(back, (x, y, face)))


@pytest.mark.parametrize("oversampling", [1, 2, 3])
def test_child_directions_are_the_fine_grid_pixels(oversampling):
    """The children of every order-3 pixel are the pixels (2^q·x + i, 2^q·y + j) of its face at order 3 + q, fine y
    outer, x inner (RELION's getOrientations order)."""
    p = np.arange(12 * 4**3)
    ipix, rot, tilt = child_directions(3, p, oversampling)
    x, y, face = nest_to_xyf(3, p)
    f = 1 << oversampling
    j, i = np.divmod(np.arange(f * f), f)
    expected = xyf_to_nest(3 + oversampling, f * x[:, None] + i, f * y[:, None] + j, face[:, None])
    np.testing.assert_array_equal(ipix, expected)
    r, t = healpix_directions(3 + oversampling)
    np.testing.assert_array_equal(rot, r[expected])
    np.testing.assert_array_equal(tilt, t[expected])


def test_oversampled_eulers_order():
    e = oversampled_eulers(2, np.array([17]), np.array([30.0]))
    assert e.shape == (1, 8, 3)
    _, rot, tilt = child_directions(2, 17)
    np.testing.assert_allclose(e[0, :, 0], np.repeat(rot, 2))
    np.testing.assert_allclose(e[0, :, 2], [26.25, 33.75] * 4)


def test_directions_within():
    idx, ang = directions_within(3, 40.0, 70.0, 10.0)
    rot, tilt = healpix_directions(3)
    all_ang = direction_angles_deg(40.0, 70.0, rot, tilt)[0]
    np.testing.assert_array_equal(idx, np.flatnonzero(all_ang < 10.0))
    assert (ang < 10).all() and len(idx) > 3
    # tiny cone: RELION falls back to the single nearest direction
    idx, _ = directions_within(3, 40.0, 70.0, 1e-3)
    assert list(idx) == [int(all_ang.argmin())]
    # vectorised over priors and symmetry-aware over a sampling's directions
    s = make_sampling(2, "D2")
    mask, ang = directions_within(
        2, np.array([40.0, -140.0]), np.array([70.0, 110.0]), 20.0, symmetry_matrices("D2"), ipix=s.ipix
    )
    assert mask.shape == (2, s.n_directions) and mask.any(1).all()


def test_perturbation():
    e = np.array([[10.0, 40.0, 20.0], [-100.0, 130.0, 300.0]])
    p = perturb_eulers(e, 0.3, 7.5)
    d = 0.3 * 7.5
    A = euler_to_matrix(*torch.from_numpy(e).T) @ euler_to_matrix(d, d, d)
    np.testing.assert_allclose(euler_to_matrix(*torch.from_numpy(p).T).numpy(), A.numpy(), atol=1e-12)
    assert perturb_eulers(e, 0.0, 7.5) is e
    rng = np.random.default_rng(0)
    r, seen = 0.0, []
    for _ in range(200):
        r_new = next_random_perturbation(r, 0.5, rng)
        assert -0.5 <= r_new <= 0.5
        step = (r_new - r) % 1.0  # increment modulo the wrap period 2f
        assert 0.25 - 1e-12 <= step <= 0.5 + 1e-12
        r = r_new
        seen.append(r)
    assert min(seen) < -0.2 and max(seen) > 0.2
    s = make_sampling(1, "C1", random_perturbation=0.4)
    np.testing.assert_allclose(
        sampling_eulers(s)[:3], perturb_eulers(sampling_eulers(s, perturbed=False)[:3], 0.4, 30.0)
    )


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="needs RELION binaries")
def test_against_relion_refine(tmp_path):
    mrcfile = pytest.importorskip("mrcfile")
    n = 16
    x = np.indices((n, n, n)) - n // 2
    vol = np.exp(-((x[0] - 2) ** 2 + (x[1] + 1) ** 2 / 2 + x[2] ** 2 / 3) / 4).astype(np.float32)
    with mrcfile.new(tmp_path / "ref.mrc") as m:
        m.set_data(vol)
        m.voxel_size = 2.0
    with mrcfile.new(tmp_path / "parts.mrcs") as m:
        m.set_data(np.random.default_rng(0).normal(size=(2, n, n)).astype(np.float32))
        m.voxel_size = 2.0
    (tmp_path / "parts.star").write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n_rlnImageSize\n"
        "_rlnImageDimensionality\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        f"1 og1 2.0 {n} 2 300 2.7 0.1\n\ndata_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n"
        "000001@parts.mrcs 1\n000002@parts.mrcs 1\n"
    )
    (tmp_path / "out").mkdir()
    subprocess.run(
        [
            "relion_refine",
            "--i",
            "parts.star",
            "--ref",
            "ref.mrc",
            "--o",
            "out/run",
            "--iter",
            "1",
            "--healpix_order",
            "3",
            "--sym",
            "D7",
            "--particle_diameter",
            "24",
            "--ini_high",
            "10",
            "--offset_range",
            "2",
            "--offset_step",
            "1",
            "--j",
            "1",
            "--pad",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=True,
    )
    text = (tmp_path / "out" / "run_it001_sampling.star").read_text().split("data_sampling_directions")[1]
    ref = np.array(
        [
            [float(v) for v in line.split()]
            for line in text.splitlines()
            if len(line.split()) == 2 and line.split()[0][0] in "-0123456789"
        ]
    )
    s = make_sampling(3, "D7")
    np.testing.assert_allclose(np.stack([s.rot_deg, s.tilt_deg], 1), ref, atol=1e-5)
