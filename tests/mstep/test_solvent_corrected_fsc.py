"""--solvent_correct_fsc in auto-refine's M-step (mstep/maximize.maximize_half_sets with a solvent mask): the FSC
that drives τ² and the resolution is that of the unregularised half maps under the mask, corrected by phase
randomisation as RELION's reconstructUnregularisedMapAndCalculateSolventCorrectedFSC (ml_optimiser_mpi.cpp, 3.1).

The data: 400 simulated particles of the packaged model (box 48, 4 Å/px) back-projected at their true poses into two
half sets; the mask: the truth above 10 % of its maximum, grown by one pixel (6 % of the box: tight)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.mstep.maximize import maximize_half_sets
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.fsc import fsc_curve, halves_fsc, phase_randomised
from cryorefine.reconstruction.from_particles import backproject_particles
from cryorefine.reconstruction.reconstruct import GRIDDING_ITERATIONS, reconstruct

from small_set import packaged_model_set

BOX, ANGPIX, N = 48, 4.0, 400
WINDOW = 20  # the E-step window (shells): the corrected FSC is 0 beyond it


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    d = packaged_model_set(tmp_path_factory.mktemp("solvent_fsc"), N, seed=1, box=BOX, angpix=ANGPIX)
    table = load_particles(d / "particles.star")
    bps = []
    for h in (0, 1):
        bp = BackProjector.zeros(BOX, 2)
        backproject_particles(table, np.arange(h, N, 2), bp, symmetry_matrices("C1"), ctf=True)
        bps.append(bp)
    truth = torch.from_numpy(read_map(d / "truth.mrc")[0]).double()
    grown = F.max_pool3d((truth > 0.1 * truth.max()).double()[None, None], 3, 1, 1)[0, 0]
    return bps, truth, grown


def relion_round(x: float) -> int:
    return int(np.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def reference_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RELION's getFSC in float64: over the half transform (each stored element once, as its loop over FFTW's r2c
    output), shells ROUND(|k|) up to d/2."""
    d = a.shape[0]
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    k, kx = np.fft.fftfreq(d, 1.0 / d), np.arange(d // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    shell = np.vectorize(relion_round)(r)
    n = d // 2 + 1
    num, d1, d2 = (np.bincount(shell[shell < n], v[shell < n], n) for v in
                   ((fa * fb.conj()).real, np.abs(fa) ** 2, np.abs(fb) ** 2))  # fmt: skip
    return num / np.sqrt(d1 * d2)


def reference_corrected(h1, h2, mask, window: int) -> np.ndarray:
    """RELION 3.1's loop (ml_optimiser_mpi.cpp 2755-2803) written out in float64; the random phases are the library's
    phase_randomised with the seed the M-step uses (RELION's own random phases cannot be reproduced)."""
    unmasked = reference_fsc(h1.numpy(), h2.numpy())
    at = next(i for i in range(1, len(unmasked)) if unmasked[i] < 0.8)
    m = mask.numpy()
    masked = reference_fsc(h1.numpy() * m, h2.numpy() * m)
    g = torch.Generator().manual_seed(0)
    r1, r2 = (phase_randomised(h, at, g).numpy() for h in (h1, h2))
    rand = reference_fsc(r1 * m, r2 * m)
    out = np.zeros_like(masked)
    for i in range(len(out)):
        if i < at + 2:
            out[i] = masked[i]
        elif rand[i] > masked[i]:
            out[i] = 0.0
        else:
            out[i] = (masked[i] - rand[i]) / (1.0 - rand[i])
    out[window + 1 :] = 0.0
    out[0] = 1.0  # the origin (RELION's can come out -1 for maps of opposite means; τ² does not use it)
    return out


def test_tight_mask_corrected_fsc_tracks_the_truth(halves):
    bps, truth, mask = halves
    particles = [N / 2, N / 2]
    plain = maximize_half_sets(bps, particles, WINDOW, 1.0, GRIDDING_ITERATIONS, final=False)
    corrected = maximize_half_sets(bps, particles, WINDOW, 1.0, GRIDDING_ITERATIONS, final=False, solvent_mask=mask)

    unfil = [reconstruct(bp, max_shell=WINDOW, particles=n) for bp, n in zip(bps, particles)]
    np.testing.assert_allclose(corrected.fsc.numpy(), reference_corrected(*unfil, mask, WINDOW), atol=1e-9)

    unmasked, masked = fsc_curve(*unfil), fsc_curve(unfil[0] * mask, unfil[1] * mask)
    # what the half maps under the mask share with the truth: FSC(half1·m, truth)·FSC(half2·m, truth)
    truth_based = fsc_curve(unfil[0] * mask, truth) * fsc_curve(unfil[1] * mask, truth)
    mid = slice(9, 15)  # past the shell where the unmasked FSC drops below 0.8 (8 here)
    assert float((masked[mid] - unmasked[mid]).min()) > 0.25  # the tight mask removes the solvent's noise
    shells = slice(1, WINDOW + 1)
    excess = corrected.fsc[shells] - truth_based[shells]
    assert float(excess.max()) < 0.05, excess  # never above the truth's FSC (beyond the sampling noise)
    assert float(excess.abs().mean()) < 0.03
    assert float((plain.fsc[shells] - truth_based[shells]).abs().mean()) > 0.2  # the unmasked FSC is far below
    assert corrected.resolution_shell > plain.resolution_shell + 5
    assert (corrected.fsc[WINDOW + 1 :] == 0).all()
    # the regularisation follows the corrected FSC: more signal, a larger τ² at mid resolution
    assert (corrected.tau2[0][mid] > plain.tau2[0][mid]).all()


def test_without_the_mask_nothing_changes(halves):
    """The control: no solvent mask (the flag off) gives the Fourier-space FSC of the accumulators, as before."""
    bps, _, _ = halves
    m = maximize_half_sets(bps, [N / 2, N / 2], WINDOW, 1.0, GRIDDING_ITERATIONS, final=False)
    assert torch.equal(m.fsc, halves_fsc(bps[0], bps[1], WINDOW).cpu())


def test_unmasked_fsc_kept_while_it_stays_above_0_8():
    """RELION: where the unmasked FSC never drops below 0.8 (early iterations at low resolution) the corrected FSC is
    the unmasked one, zero beyond the window."""
    from cryorefine.reconstruction.fsc import refine_solvent_corrected_fsc

    g = torch.Generator().manual_seed(0)
    vol = torch.randn(16, 16, 16, generator=g, dtype=torch.float64)
    other = vol + 0.01 * torch.randn(16, 16, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(16, 16, 16, dtype=torch.float64)
    mask[4:12, 4:12, 4:12] = 1.0
    got = refine_solvent_corrected_fsc(vol, other, mask, max_shell=5)
    expect = fsc_curve(vol, other)
    expect[6:] = 0.0
    assert torch.equal(got, expect)


def test_flag_without_a_solvent_mask_is_refused(tmp_path, capsys):
    """RELION 3.1 silently keeps the unmasked FSC when --solvent_correct_fsc comes without a mask; here it stops."""
    from cryorefine.cli.main import main

    d = packaged_model_set(tmp_path, 8, seed=2, box=32, angpix=6.0)
    argv = ["refine", "--i", str(d / "particles_noposes.star"), "--o", str(d / "r" / "run"), "--ref",
            str(d / "truth.mrc"), "--particle_diameter", "120", "--solvent_correct_fsc"]  # fmt: skip
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--solvent_correct_fsc" in lines[0] and "--solvent_mask" in lines[0], lines
    assert not list((d / "r").iterdir())


def test_refine_passes_the_mask_only_with_the_flag(tmp_path, monkeypatch):
    """`cryorefine refine` hands its M-step the solvent mask with --solvent_correct_fsc, and nothing without."""
    import cryorefine.refine.auto_refine as auto_refine
    from cryorefine.cli.main import main
    from cryorefine.io.mrc import write_map

    d = packaged_model_set(tmp_path, 20, seed=2, box=32, angpix=6.0)
    mask = (torch.from_numpy(read_map(d / "truth.mrc")[0]) > 0).float()
    write_map(d / "mask.mrc", mask.numpy(), 6.0)
    seen = []
    real = auto_refine.maximize_half_sets
    monkeypatch.setattr(
        auto_refine, "maximize_half_sets", lambda *a, **k: seen.append(k["solvent_mask"]) or real(*a, **k)
    )
    for flag in ([], ["--solvent_correct_fsc"]):
        out = d / f"r{len(flag)}" / "run"
        out.parent.mkdir()
        argv = ["refine", "--i", str(d / "particles_noposes.star"), "--o", str(out), "--ref", str(d / "truth.mrc"),
                "--particle_diameter", "120", "--healpix_order", "1", "--offset_range", "1", "--offset_step", "1",
                "--iter", "1", "--solvent_mask", str(d / "mask.mrc"), *flag]  # fmt: skip
        assert main(argv) == 0
    assert len(seen) == 2 and seen[0] is None and torch.equal(seen[1], mask)
