"""The optics model against RELION 3.1.3, both ways: particles simulated by us with beam tilt, odd and even Zernike
aberrations and an anisotropic magnification (optics columns as RELION writes them) reconstruct to the truth in
relion_reconstruct --ctf (which applies RELION's model: its magnification, demodulation and aberrated CTF), and in
ours, which gives RELION's map.

Noise-free, 400 particles of box 96 at 1.2 Å/px (Nyquist 2.4 Å). Measured: the FSC to the truth stays above 0.98 to
2.5 Å for both programs and ours against RELION's map 0.998. The controls drop one optics term's columns from
the same file (the images keep it): each one alone pulls some shells of RELION's reconstruction far below (the
worst shell's FSC), so each term is both applied and in RELION's convention (a sign or an axis swapped would do the
same).
"""

import shutil
import subprocess

import numpy as np
import pytest
import starfile
import torch

from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.io.mrc import read_map, write_stack
from cryorefine.ctf import ctf_for_particles
from cryorefine.fourier.grids import irfft2_centered, rfft2_centered, rfft_freqs_2d
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.reconstruction.from_particles import reconstruct_from_particles
from cryorefine.reconstruction.fsc import fsc_curve
from cryorefine.simulate import Microscope, particle_image_rfft, simulate_particles

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION binaries not installed"),
]

BOX, ANGPIX, N = 96, 1.2, 400
SCOPE = Microscope(
    beam_tilt_mrad=(1.5, -1.0),
    odd_zernike=(0.0, 0.0, 40.0),  # trefoil
    even_zernike=(0.0, 0.0, 0.0, 0.0, 100.0),  # quadrafoil
    mag=(1.015, 0.005, 0.003, 0.99),  # 1.5 % and -1 % along the axes, a small shear
)
TERMS = {
    "beam tilt": ("rlnBeamTiltX", "rlnBeamTiltY"),
    "odd Zernike": ("rlnOddZernike",),
    "even Zernike": ("rlnEvenZernike",),
    "magnification": ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"),
}
GOOD, BAD = 0.98, 0.9  # FSC to the truth on every shell with the model; the worst shell without one term


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("aberrations")
    truth = atoms_to_map(*read_atoms(packaged_model()), BOX, ANGPIX, 50.0)
    simulate_particles(truth, ANGPIX, d / "sim", N, snr=0.0, seed=3, microscope=SCOPE)
    return d


def relion_reconstruct(d, star: str, out: str) -> np.ndarray:
    p = subprocess.run(["relion_reconstruct", "--i", star, "--o", out, "--ctf"], cwd=d, capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    return read_map(d / out)[0]


def fsc_to(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC on shells 1 .. Nyquist − 2 (the last two: too few of 400 images' pixels to fill them)."""
    return fsc_curve(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy()[1 : BOX // 2 - 1]


def test_relion_and_we_reconstruct_our_aberrated_particles(data):
    truth = read_map(data / "sim/truth.mrc")[0]
    relion = relion_reconstruct(data, "sim/particles.star", "relion.mrc")
    ours, _ = reconstruct_from_particles(load_particles(data / "sim/particles.star"), ctf=True)
    ours = ours.cpu().numpy()
    worst = {"RELION": fsc_to(relion, truth).min(), "ours": fsc_to(ours, truth).min()}
    print(f"worst shell's FSC to the truth: {worst}, ours to RELION's map {fsc_to(ours, relion).min():.5f}")
    assert fsc_to(relion, truth).min() > GOOD  # our images carry RELION's optics model
    assert fsc_to(ours, truth).min() > GOOD  # and we correct them as RELION does
    assert fsc_to(ours, relion).min() > 0.995  # measured 0.998


@pytest.mark.parametrize("term", list(TERMS))
def test_control_without_one_term_relion_misses(data, term):
    blocks = starfile.read(data / "sim/particles.star")
    blocks["optics"] = blocks["optics"].drop(columns=list(TERMS[term]))
    star = f"sim/without_{term.replace(' ', '_')}.star"
    starfile.write(blocks, data / star, overwrite=True)
    missing = relion_reconstruct(data, star, f"without_{term.replace(' ', '_')}.mrc")
    worst = fsc_to(missing, read_map(data / "sim/truth.mrc")[0]).min()
    print(f"without the {term}: worst shell's FSC to the truth {worst:.3f}")
    assert worst < BAD


def relion_project(d, star: str, out: str) -> torch.Tensor:
    p = subprocess.run(["relion_project", "--i", "sim/truth.mrc", "--ang", star, "--ctf", "--o", out], cwd=d,
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    return torch.from_numpy(read_images(load_particles(d / f"{out}.star"), np.arange(N_PROJECTED))).double()


N_PROJECTED = 24


def test_relion_project_applies_magnification_and_even_aberrations_in_the_ctf(data):
    """relion_project 3.1.3 (measured here, as its source reads): the CTF at M·k with the even aberrations, the
    projection itself not magnified, and the beam tilt and odd aberrations not applied at all. Our CTF
    (ctf_for_particles with the optics group's M and even Zernike) on the same undistorted projections gives its
    images; without them (the control) it does not."""
    table = load_particles(data / "sim/particles.star")
    theirs = relion_project(data, "sim/particles.star", "projected")
    blocks = starfile.read(data / "sim/particles.star")
    blocks["optics"] = blocks["optics"].drop(columns=[*TERMS["beam tilt"], *TERMS["odd Zernike"]])
    starfile.write(blocks, data / "sim/no_odd.star", overwrite=True)
    assert torch.allclose(relion_project(data, "sim/no_odd.star", "projected_no_odd"), theirs, atol=1e-5)
    idx = np.arange(N_PROJECTED)
    ky, kx = rfft_freqs_2d(BOX, dtype=torch.float64)
    A = euler_to_matrix(table.rot_deg[idx], table.tilt_deg[idx], table.psi_deg[idx])
    origin = torch.from_numpy(np.stack([table.origin_x_angst[idx], table.origin_y_angst[idx]], -1) / ANGPIX)
    ref = prepare_padded_transform(torch.from_numpy(read_map(data / "sim/truth.mrc")[0]).double(), 2)

    def ours(with_optics: bool) -> torch.Tensor:
        t = table if with_optics else load_particles(data / "sim/plain_ctf.star")
        c = ctf_for_particles(t, idx, ky, kx, BOX, dtype=torch.float64)
        return irfft2_centered(particle_image_rfft(ref, A, origin, c, BOX), BOX)

    plain = starfile.read(data / "sim/particles.star")
    plain["optics"] = plain["optics"].drop(columns=[c for cols in TERMS.values() for c in cols])
    starfile.write(plain, data / "sim/plain_ctf.star", overwrite=True)
    for with_optics in (True, False):
        a, b = ours(with_optics).flatten(1), theirs.flatten(1)
        err = ((a - b).norm(dim=1) / b.norm(dim=1)).max()
        print(
            f"our CTF {'with' if with_optics else 'without'} M and even aberrations: largest relative error {err:.4f}"
        )
        assert (err < 0.02) == with_optics


@pytest.mark.parametrize("flag", [1, 0])
def test_ctf_premultiplied_particles(data, flag):
    """rlnCtfDataAreCtfPremultiplied 1 (each image's transform already multiplied by its CTF, as RELION's
    premultiplied extraction writes): relion_reconstruct --ctf and ours back-project the image as it is with the
    weight CTF², and both find the truth. The control says 0 for the same images: CTF·CTF·P back-projected with
    weight CTF² is not the map."""
    table = load_particles(data / "sim/particles.star")
    idx = np.arange(N)
    ky, kx = rfft_freqs_2d(BOX, dtype=torch.float64)
    f = rfft2_centered(torch.from_numpy(read_images(table, idx)).double())
    premultiplied = irfft2_centered(f * ctf_for_particles(table, idx, ky, kx, BOX, dtype=torch.float64), BOX)
    write_stack(data / "sim/premultiplied.mrcs", premultiplied.float().numpy(), ANGPIX)
    blocks = starfile.read(data / "sim/particles.star")
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = flag
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@sim/premultiplied.mrcs" for i in idx]
    star = f"sim/premultiplied_{flag}.star"
    starfile.write(blocks, data / star, overwrite=True)
    truth = read_map(data / "sim/truth.mrc")[0]
    relion = relion_reconstruct(data, star, f"premultiplied_{flag}.mrc")
    ours, _ = reconstruct_from_particles(load_particles(data / star, project_dir=data), ctf=True)
    worst = {"RELION": fsc_to(relion, truth).min(), "ours": fsc_to(ours.cpu().numpy(), truth).min()}
    print(f"rlnCtfDataAreCtfPremultiplied {flag}: worst shell's FSC to the truth {worst}")
    for value in worst.values():
        assert (value > GOOD) if flag else (value < BAD)
