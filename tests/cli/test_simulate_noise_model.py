"""`cryorefine simulate --model_noise model.star`: coloured noise with the σ² spectra of a RELION 3.1 model.star (as
relion_project --model_noise reads them), remapped to the images' box and pixel size as RELION's refinement does.

The images' measured noise power per shell, in RELION's units (transforms normalised by 1/box², the variance of each
of the real and imaginary parts), matches the file's spectrum at the same spatial frequency; white noise (no
--model_noise) does not (the control)."""

import numpy as np
import pandas as pd
import pytest

from cryorefine.cli.main import main
from cryorefine.io.particles import load_particles
from cryorefine.io.star import read_star, write_star_table
from cryorefine.io.table import read_images

MODEL_BOX, MODEL_ANGPIX = 80, 1.5  # the model's images: 120 Å
BOX, ANGPIX = 48, 2.0  # the simulated ones: 96 Å, so image shell s is the model's shell round(1.25 s)
N, MICS = 600, 2
N_SNR = 100  # the sets that check the SNR
SHELLS = np.arange(MODEL_BOX // 2 + 1)
SPECTRA = [
    1e-4 * (1 + 20 * np.exp(-SHELLS / 6.0)),  # group 1: strong at low resolution, as real noise is
    3e-4 * (1 + 0.2 * np.cos(SHELLS / 3.0)),  # group 2: another shape, 3× stronger
]


def write_model_star(path, spectra) -> None:
    """A RELION 3.1 model.star with the noise spectra ``spectra`` (one per group) in its data_model_group_N."""
    general = {"rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": MODEL_BOX,
               "rlnPixelSize": MODEL_ANGPIX, "rlnNrClasses": 1, "rlnNrGroups": len(spectra)}  # fmt: skip
    groups = pd.DataFrame({"rlnGroupNumber": [1, 2], "rlnGroupName": ["mic_a", "mic_b"]})
    blocks: dict = {"model_general": general, "model_groups": groups}
    for k, s2 in enumerate(spectra, 1):
        res = np.where(SHELLS > 0, SHELLS / (MODEL_BOX * MODEL_ANGPIX), 0.0)
        blocks[f"model_group_{k}"] = pd.DataFrame(
            {"rlnSpectralIndex": SHELLS, "rlnResolution": res, "rlnSigma2Noise": s2}
        )
    write_star_table(path, blocks)


def expected_sigma2(spectrum: np.ndarray) -> np.ndarray:
    """The file's σ² at image shells 0..BOX/2: RELION's remapping, model shell = ROUND(s · 120 Å / 96 Å)."""
    s = np.arange(BOX // 2 + 1)
    return spectrum[np.minimum(np.floor(s * MODEL_BOX * MODEL_ANGPIX / (BOX * ANGPIX) + 0.5).astype(int), 40)]


def measured_sigma2(images: np.ndarray) -> np.ndarray:
    """Mean noise power per shell 0..BOX/2 in RELION's units: |F/box²|²/2 over the rfft half-plane of every image."""
    f = np.fft.rfft2(images) / BOX**2
    ky, kx = np.meshgrid(np.fft.fftfreq(BOX, 1 / BOX), np.arange(BOX // 2 + 1), indexing="ij")
    shell = np.round(np.hypot(ky, kx)).astype(int)
    power = (np.abs(f) ** 2 / 2).mean(axis=0)
    keep = shell <= BOX // 2
    return np.bincount(shell[keep], power[keep]) / np.bincount(shell[keep])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("noise")
    write_model_star(d / "model.star", SPECTRA)
    common = ["--box", str(BOX), "--angpix", str(ANGPIX), "--micrographs", str(MICS), "--seed", "3"]
    model = ["--model_noise", str(d / "model.star")]
    out = {}
    # --snr 1e-6: the images are noise (the signal, scaled to that SNR against the noise, is negligible)
    for name, n, extra in (
        ("coloured", N, [*model, "--snr", "1e-6"]),
        ("white", N, ["--snr", "1e-6"]),
        ("snr", N_SNR, [*model, "--snr", "0.5"]),
        ("clean", N_SNR, ["--snr", "0"]),
    ):
        assert main(["simulate", "--o", str(d / name), "--n", str(n), *common, *extra]) == 0
        out[name] = read_images(load_particles(d / name / "particles.star"), np.arange(n)).astype(np.float64)
    return d, out


def test_noise_power_spectrum_is_the_files(runs):
    d, images = runs
    truth = read_star(d / "coloured" / "micrographs_truth.star")["micrographs"]
    assert list(truth["rlnGroupName"]) == ["mic_a", "mic_b"]  # micrograph m takes the model's group m mod 2
    shells = slice(2, BOX // 2 + 1)
    for m in range(MICS):
        ratio = measured_sigma2(images["coloured"][m * N // MICS : (m + 1) * N // MICS]) / expected_sigma2(SPECTRA[m])
        print(f"micrograph {m + 1}: measured / file σ², shells 2..{BOX // 2}: {ratio[shells].min():.3f} .. "
              f"{ratio[shells].max():.3f}, mean {ratio[shells].mean():.4f}")  # fmt: skip
        assert np.abs(ratio[shells] - 1).max() < 0.06
        assert abs(ratio[shells].mean() - 1) < 0.02


def test_the_signal_is_scaled_to_the_snr_against_the_files_noise(runs):
    _, images = runs
    clean, noisy = images["clean"], images["snr"]
    k = np.sum(noisy * clean) / np.sum(clean * clean)  # the signal's scale in the noisy set
    first = slice(0, N_SNR // MICS)  # the SNR is against the first micrograph's noise (group 1's spectrum)
    snr = (k * clean).var(axis=(1, 2)).mean() / (noisy - k * clean)[first].var()
    print(f"SNR against the file's noise: {snr:.3f}")
    assert 0.45 < snr < 0.55


def test_white_noise_does_not_have_the_files_spectrum(runs):
    _, images = runs
    ratio = measured_sigma2(images["white"][: N // MICS]) / expected_sigma2(SPECTRA[0])
    spread = ratio[2:].max() / ratio[2:].min()
    print(f"white noise / file σ²: max/min over shells {spread:.1f}")
    assert spread > 5


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--model_noise", "MODEL", "--snr", "0"], "--snr"),
        (["--model_noise", "PARTICLES"], "--model_noise"),
    ],
)
def test_bad_model_noise_is_one_line_error(runs, capsys, extra, word):
    d, _ = runs
    paths = {"MODEL": str(d / "model.star"), "PARTICLES": str(d / "white" / "particles.star")}
    extra = [paths.get(e, e) for e in extra]
    assert main(["simulate", "--o", str(d / "bad"), "--n", "4", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
