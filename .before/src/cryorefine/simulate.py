"""Simulated particle sets with known truth: projections of a map with CTF, shifts and Gaussian noise; optionally what
real data has (micrographs with their defocus and scale, coloured noise, junk, preferred views, optics groups of
different pixel sizes), the truth of each kept where no refinement reads it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .projection.extract import PaddedTransform, prepare_padded_transform, project_rfft
from .ctf import compute_ctf
from .fourier.grids import irfft2_centered, rfft2_centered, rfft_freqs_2d
from .fourier.shift import shift_images_rfft
from .geometry.euler import euler_to_matrix
from .errors import CryoInputError
from .io.mrc import StackWriter, write_map
from .io.particles import ABERRATION_COLUMNS, numeric_column
from .io.star import read_star, write_star
from .io.table import OpticsGroup, project_relative
from .optics import IDENTITY_MAG, demodulation_factors

NO_POSES_STAR = "particles_noposes.star"  # the simulated particles as a user has them: no angles, no origin offsets
MICROGRAPHS_TRUTH_STAR = "micrographs_truth.star"  # each micrograph's defocus and true scale (no refinement reads it)
TRUTH_CLASS_COLUMN = "rlnClassNumber"  # in the truth particles.star only: 1 a particle, JUNK_CLASS junk
JUNK_CLASS = 2


def without_poses(particles: pd.DataFrame) -> pd.DataFrame:
    """The particles table without rlnAngle*/rlnOrigin* columns (poses, priors, offsets): where every evaluated
    refinement starts, so that no figure is flattered by a start at the truth."""
    return particles.drop(columns=[c for c in particles.columns if c.startswith(("rlnAngle", "rlnOrigin"))])


@dataclass(frozen=True)
class Microscope:
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    # the optics group's aberrations and magnification (RELION's meaning and order: optics.py)
    beam_tilt_mrad: tuple[float, float] = (0.0, 0.0)
    odd_zernike: tuple[float, ...] = ()
    even_zernike: tuple[float, ...] = ()
    mag: tuple[float, float, float, float] = IDENTITY_MAG

    def optics_group(self, angpix: float, box: int) -> OpticsGroup:
        return OpticsGroup(1, "opticsGroup1", angpix, box, self.voltage_kv, self.cs_mm, self.amplitude_contrast,
                           beam_tilt_mrad=self.beam_tilt_mrad, odd_zernike=self.odd_zernike,
                           even_zernike=self.even_zernike, mag=self.mag)  # fmt: skip

    def optics_columns(self) -> dict:
        """data_optics' columns of the aberrations the scope has (none for a perfect one)."""
        cols: dict = {}
        if self.beam_tilt_mrad != (0.0, 0.0):
            cols |= {"rlnBeamTiltX": [self.beam_tilt_mrad[0]], "rlnBeamTiltY": [self.beam_tilt_mrad[1]]}
        for name, values in (("rlnOddZernike", self.odd_zernike), ("rlnEvenZernike", self.even_zernike)):
            if values:
                cols[name] = ["[" + ",".join(f"{v:.12g}" for v in values) + "]"]
        if self.mag != IDENTITY_MAG:
            cols |= {f"rlnMagMat{ij}": [v] for ij, v in zip(("00", "01", "10", "11"), self.mag)}
        return cols


@dataclass(frozen=True)
class Micrographs:
    """The particles divided among ``count`` micrographs in contiguous runs (as extracted, micrograph by micrograph).

    Each micrograph has its defocus (the set's defocus range, astigmatism and angle) and an intensity scale, uniform
    in ``scale`` (min, max), that multiplies the signal of its particles, not their noise: the signal-to-noise
    amplitude ratio RELION's --scale estimates per group (rlnGroupScaleCorrection). Each particle's defocus is its
    micrograph's plus a Gaussian of sd ``defocus_spread_angst`` (Å), the same on U and V (its height in the ice).
    """

    count: int
    defocus_spread_angst: float = 50.0
    scale: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class NoiseModel:
    """The noise σ² spectra of a RELION 3.1 model.star, one per group, in RELION's units: the variance of the real and
    of the imaginary part of its 2D transforms (normalised by 1/box²), per shell 0..box/2."""

    names: tuple[str, ...]  # rlnGroupName of each group, in the file's order
    sigma2: np.ndarray  # (groups, box // 2 + 1)
    box: int  # rlnOriginalImageSize (px)
    angpix: float  # rlnPixelSize (Å)


@dataclass(frozen=True)
class Junk:
    """A ``fraction`` of the particles replaced by junk: pure noise, or with ``maps`` (one per optics group, each at its
    box and pixel size) projections of another structure at the particle's pose, CTF and offset, the map scaled to the
    power (sum of squares) of the group's truth map."""

    fraction: float
    maps: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class PreferredView:
    """Projection directions from a von Mises–Fisher distribution of concentration ``kappa`` about +z (density on the
    sphere ∝ exp(κ cos tilt)), a ``uniform_fraction`` of them uniform instead."""

    kappa: float
    uniform_fraction: float = 0.0


def random_poses(
    n: int,
    max_shift_angst: float,
    generator: torch.Generator,
    view: PreferredView | None = None,
    rng: np.random.Generator | None = None,
):
    """Rotations (ZYZ: rot and psi uniform; cos(tilt) uniform, i.e. uniform over SO(3), or from ``view``, ``rng``
    choosing its uniform ones) and shifts (Å) uniform in a disc of radius ``max_shift_angst``."""
    rot = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    tilt = torch.rad2deg(torch.acos(u * 2 - 1 if view is None else view_cosines(u, view, rng)))
    psi = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    radius = max_shift_angst * torch.sqrt(torch.rand(n, generator=generator, dtype=torch.float64))
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * np.pi
    return rot, tilt, psi, radius * torch.cos(phi), radius * torch.sin(phi)


def view_cosines(u: torch.Tensor, view: PreferredView, rng: np.random.Generator | None) -> torch.Tensor:
    """cos(tilt) (n,) of ``view``'s directions from draws ``u`` (n,) uniform in [0, 1): the inverse of the von
    Mises–Fisher distribution function of w = cos(tilt), F(w) = (e^{κw} − e^{−κ}) / (e^{κ} − e^{−κ}), written so that
    a large κ cannot overflow; a ``view.uniform_fraction`` of them (chosen by ``rng``) uniform, 2u − 1."""
    k = view.kappa
    vmf = (1 + torch.log(u + (1 - u) * math.exp(-2 * k)) / k).clamp(-1.0, 1.0)
    if view.uniform_fraction <= 0:
        return vmf
    assert rng is not None  # the uniform ones are chosen by draws of their own
    uniform = torch.from_numpy(rng.random(len(u)) < view.uniform_fraction)
    return torch.where(uniform, u * 2 - 1, vmf)


def random_defocus(
    n: int, defocus_min_angst: float, defocus_max_angst: float, astigmatism_angst: float, generator: torch.Generator
):
    """DefocusU, DefocusV (Å) and DefocusAngle (°), each (n,) float64: their mean uniform in [min, max], U − V uniform
    in ±astigmatism/2, the angle uniform in [0, 180)."""
    dmean = (
        torch.rand(n, generator=generator, dtype=torch.float64) * (defocus_max_angst - defocus_min_angst)
        + defocus_min_angst
    )
    dastig = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5) * astigmatism_angst
    du, dv = dmean + dastig / 2, dmean - dastig / 2
    return du, dv, torch.rand(n, generator=generator, dtype=torch.float64) * 180


def contiguous_runs(n: int, parts: int) -> np.ndarray:
    """(n,) int: the run each of n items falls in when they are divided into ``parts`` contiguous runs of (nearly)
    equal length."""
    return np.arange(n) * parts // n


def micrograph_names(count: int) -> list[str]:
    """RELION-like rlnMicrographName of ``count`` micrographs, as a Motion Correction job names them."""
    return [f"MotionCorr/job002/Movies/mic{m + 1:04d}.mrc" for m in range(count)]


@dataclass(frozen=True)
class MicrographDraws:
    table: pd.DataFrame  # one row per micrograph: its name, defocus (Å, °) and true scale
    of_particle: np.ndarray  # (n,) int: each particle's micrograph
    defocus: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # each particle's DefocusU, V (Å) and Angle (°), (n,)


def draw_micrographs(
    mics: Micrographs,
    n: int,
    defocus_min_angst: float,
    defocus_max_angst: float,
    astigmatism_angst: float,
    generator: torch.Generator,
) -> MicrographDraws:
    """Each micrograph's defocus and scale, each particle's micrograph and defocus (``Micrographs``)."""
    du, dv, dang = random_defocus(mics.count, defocus_min_angst, defocus_max_angst, astigmatism_angst, generator)
    of = contiguous_runs(n, mics.count)
    height = torch.randn(n, generator=generator, dtype=torch.float64) * mics.defocus_spread_angst
    lo, hi = mics.scale
    scale = lo + torch.rand(mics.count, generator=generator, dtype=torch.float64) * (hi - lo)
    table = pd.DataFrame(
        {
            "rlnMicrographName": micrograph_names(mics.count),
            "rlnDefocusU": du.numpy(),
            "rlnDefocusV": dv.numpy(),
            "rlnDefocusAngle": dang.numpy(),
            "rlnGroupScaleCorrection": scale.numpy(),
        }
    )
    i = torch.from_numpy(of)
    return MicrographDraws(table, of, (du[i] + height, dv[i] + height, dang[i]))


def read_noise_model(path) -> NoiseModel:
    """The noise σ² spectra of a RELION 3.1 model.star (data_model_general, data_model_groups, data_model_group_N), as
    relion_project --model_noise reads them."""
    blocks = read_star(path)
    general = blocks.get("model_general")
    if general is None or not {"rlnOriginalImageSize", "rlnPixelSize"} <= set(general.columns):
        raise CryoInputError(
            "--model_noise needs RELION's model.star, with rlnOriginalImageSize and rlnPixelSize in data_model_general",
            path,
        )
    box = int(numeric_column(general, "rlnOriginalImageSize", "model_general", path, whole=True)[0])
    angpix = float(numeric_column(general, "rlnPixelSize", "model_general", path)[0])
    tables: list[pd.DataFrame] = []
    while f"model_group_{len(tables) + 1}" in blocks:
        tables.append(blocks[f"model_group_{len(tables) + 1}"])
    if box < 2 or angpix <= 0 or not tables or any("rlnSigma2Noise" not in t.columns for t in tables):
        raise CryoInputError(
            "--model_noise reads RELION 3.1's noise spectra (rlnSigma2Noise in data_model_group_1, 2, ...); give the "
            "run_model.star or run_itNNN_model.star of a RELION 3.1 refinement or classification",
            path,
        )
    sigma2 = np.zeros((len(tables), box // 2 + 1))
    for k, t in enumerate(tables):
        block = f"model_group_{k + 1}"
        shell = numeric_column(t, "rlnSpectralIndex", block, path, whole=True) if "rlnSpectralIndex" in t else None
        shell = np.arange(len(t)) if shell is None else shell
        keep = (shell >= 0) & (shell <= box // 2)
        sigma2[k, shell[keep]] = numeric_column(t, "rlnSigma2Noise", block, path)[keep]
    if (sigma2 < 0).any():
        raise CryoInputError("--model_noise: a negative rlnSigma2Noise; σ² is a variance, fix the file", path)
    groups = blocks.get("model_groups")
    names = [f"group{k + 1}" for k in range(len(tables))]
    if groups is not None and "rlnGroupName" in groups and len(groups) == len(tables):
        names = [str(v) for v in groups["rlnGroupName"]]
    return NoiseModel(tuple(names), sigma2, box, angpix)


def noise_sigma2_grid(model: NoiseModel, box: int, angpix: float) -> torch.Tensor:
    """(groups, d, d) float64: the model's σ² at every pixel of a full 2D transform of this box (px) and pixel size
    (Å), in torch.fft's layout.

    As RELION's refinement maps a model's σ² onto an optics group of another box or pixel size: the pixel's shell
    round(|k|) becomes the model's shell round(|k|·box_m·angpix_m / (box·angpix)), the same spatial frequency, and
    the values are used as they are. Shells past the model's last take its last σ², as relion_project does past its
    Nyquist."""
    k = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
    shell = torch.round(torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2))
    ratio = model.box * model.angpix / (box * angpix)
    model_shell = torch.floor(shell * ratio + 0.5).long().clamp(max=model.sigma2.shape[1] - 1)  # RELION's ROUND
    return torch.from_numpy(model.sigma2)[:, model_shell]


def noise_filter(model: NoiseModel, box: int, angpix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The filter (groups, d, d//2+1) that turns white noise of unit variance into noise of the model's σ² in this box
    (px) and pixel size (Å), and that noise's real-space variance (groups,).

    A unit white image's transform has variance d²/2 in each part (unnormalised; RELION's, normalised by 1/d²,
    1/(2d²)): the filter is √(2d²σ²). By Parseval the real-space variance is the sum of E|F|² = 2σ² over the full
    transform (RELION's normalisation)."""
    sigma2 = noise_sigma2_grid(model, box, angpix)
    return torch.sqrt(2 * box**2 * sigma2[..., : box // 2 + 1]), 2 * sigma2.sum(dim=(-2, -1))


def junk_mask(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool: round(fraction·n) of the n particles, chosen at random, are junk."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=round(fraction * n), replace=False)] = True
    return mask


def _stream(seed: int, purpose: int) -> np.random.Generator:
    """A random stream of its own for an optional draw (junk, uniform views): the option leaves every other draw, and
    so every other image, as it is without it."""
    return np.random.default_rng([seed, purpose])


def particle_image_rfft(transform, rotations, origin_px, ctf, box: int, mag=IDENTITY_MAG, modulation=None):
    """Clean particle transforms (n, d, d//2+1): CTF × projection (of the map at M·k), times the odd aberrations'
    phase ``modulation`` (d, d//2+1) if given, moved by the origin offset.

    RELION's rlnOriginX/Y (here in pixels) is the shift that brings the particle back onto the centre,
    so the particle itself sits at -origin.
    """
    f = project_rfft(transform, rotations, mag=mag)
    if ctf is not None:
        f = f * ctf
    if modulation is not None:
        f = f * modulation
    return shift_images_rfft(f, -origin_px, box)


def odd_modulation(microscope: Microscope, angpix: float, box: int, device=None) -> torch.Tensor | None:
    """exp(+iφ) (d, d//2+1) of the scope's odd aberrations (beam tilt included): what RELION's demodulatePhase
    removes. None without any."""
    ky, kx = rfft_freqs_2d(box, device, torch.float64)
    phase = demodulation_factors([microscope.optics_group(angpix, box)], ky.flatten(), kx.flatten(), box)
    return None if phase is None else phase[0].conj().reshape(box, box // 2 + 1)


@dataclass(frozen=True)
class _Projector:
    """Clean images of one map in one optics group (box d px, pixel size Å): projection, CTF, the scope's aberrations
    and the particles' origin offsets."""

    transform: PaddedTransform
    angpix: float
    microscope: Microscope
    ctf: bool
    device: torch.device | str | None
    ky: torch.Tensor  # (d, d//2+1) float32
    kx: torch.Tensor
    modulation: torch.Tensor | None

    @property
    def box(self) -> int:
        return self.ky.shape[0]

    def images(self, draws: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """(b, d, d) float32 images of the particles ``rows`` of ``draws`` (each (n,) float64: Euler angles in °,
        origins in Å, defocus in Å and its angle in °)."""
        A = euler_to_matrix(draws["rot"][rows], draws["tilt"][rows], draws["psi"][rows])
        c = None
        if self.ctf:
            scope = self.microscope
            c = compute_ctf(
                self.ky, self.kx, self.box, self.angpix, draws["du"][rows], draws["dv"][rows], draws["dang"][rows],
                scope.voltage_kv, scope.cs_mm, scope.amplitude_contrast, mag=scope.mag, even_zernike=scope.even_zernike,
            ).to(torch.float32)  # fmt: skip
        origin_px = torch.stack([draws["ox"][rows], draws["oy"][rows]], -1) / self.angpix
        f = particle_image_rfft(
            self.transform,
            A.to(device=self.device, dtype=torch.float32),
            origin_px.to(device=self.device, dtype=torch.float32),
            c,
            self.box,
            self.microscope.mag,
            self.modulation,
        )
        return irfft2_centered(f, self.box)


def _projector(volume: torch.Tensor, angpix: float, microscope: Microscope, ctf: bool, device) -> _Projector:
    box = volume.shape[-1]
    transform = prepare_padded_transform(volume.to(device=device, dtype=torch.float32), 2)
    ky, kx = rfft_freqs_2d(box, device, torch.float32)
    return _Projector(
        transform, angpix, microscope, ctf, device, ky, kx, odd_modulation(microscope, angpix, box, device)
    )


@dataclass
class _Greyscale:
    """The noise level and the images' greyscale, fixed by the first batch.

    The noise is ``noise_sigma`` × a unit noise of real-space sd ``unit_sd`` (white: 1; coloured: that of the first
    group's first micrograph), noise_sigma² the first batch's mean clean-image variance / SNR unless given. The images
    are divided by ``grey`` = noise_sigma / unit_sd: their noise is white of unit variance, or coloured with the model's
    σ², and the signal of every group on one scale."""

    snr: float
    noise_sigma: float | None
    unit_sd: float = 1.0
    grey: float | None = None

    def fix(self, clean: torch.Tensor) -> float:
        if self.grey is None:
            if self.noise_sigma is None:  # else given: several sets on one greyscale
                signal_var = float(clean.var(dim=(-2, -1)).mean()) if self.snr > 0 else 0.0
                self.noise_sigma = (signal_var / self.snr) ** 0.5 if self.snr > 0 else 0.0
            self.grey = self.noise_sigma / self.unit_sd if self.noise_sigma > 0 else 1.0
        return self.grey

    def noise(self, shape, generator: torch.Generator, device, amplitudes: torch.Tensor | None) -> torch.Tensor:
        """(b, d, d) noise: white, or with ``amplitudes`` (b, d, d//2+1) white noise filtered (``noise_filter``)."""
        assert self.noise_sigma is not None  # fixed by the first batch
        white = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        if amplitudes is None:
            return white * self.noise_sigma
        return irfft2_centered(rfft2_centered(white) * amplitudes, shape[-1]) * (self.noise_sigma / self.unit_sd)


@dataclass(frozen=True)
class _Extras:
    """Per particle (n,): its micrograph's scale of the signal (None: 1), whether it is junk (None: none is), its noise
    model's group; and the projector of the junk structure (None: pure-noise junk)."""

    scale: torch.Tensor | None
    is_junk: np.ndarray | None
    noise_group: np.ndarray
    junk: _Projector | None


def _write_group_stack(
    path: Path,
    rows: range,
    project: _Projector,
    extras: _Extras,
    draws: dict[str, torch.Tensor],
    amplitudes: torch.Tensor | None,
    grey: _Greyscale,
    generator: torch.Generator,
    batch: int,
) -> None:
    """The images of particles ``rows`` (one optics group) into the stack ``path``, batch by batch: clean images (the
    first fixes the greyscale), junk, micrograph scales, noise (white, or coloured by ``amplitudes`` (groups, d,
    d//2+1) of each particle's ``extras.noise_group``)."""
    writer = StackWriter(path, len(rows), project.box, project.angpix)
    try:
        for start in range(0, len(rows), batch):
            sl = slice(rows.start + start, rows.start + min(start + batch, len(rows)))
            clean = project.images(draws, sl)
            level = grey.fix(clean)  # before junk and micrograph scales: the SNR is that of the particles
            if extras.is_junk is not None and extras.is_junk[sl].any():
                junk = torch.zeros_like(clean) if extras.junk is None else extras.junk.images(draws, sl)
                clean = torch.where(torch.from_numpy(extras.is_junk[sl]).to(clean.device)[:, None, None], junk, clean)
            if extras.scale is not None:
                clean = clean * extras.scale[sl].to(device=clean.device, dtype=clean.dtype)[:, None, None]
            amp = None if amplitudes is None else amplitudes[torch.from_numpy(extras.noise_group[sl])]
            noise = grey.noise(clean.shape, generator, clean.device, None if amp is None else amp.to(clean.device))
            writer.write(start, ((clean + noise) / level).cpu().numpy())
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _optics_table(microscope: Microscope, groups: list[tuple[float, int]]) -> pd.DataFrame:
    """data_optics, one row per optics group (pixel size Å, box px), each with the scope's aberrations."""
    g = len(groups)
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{k + 1}" for k in range(g)],
            "rlnOpticsGroup": list(range(1, g + 1)),
            "rlnImagePixelSize": [a for a, _ in groups],
            "rlnImageSize": [b for _, b in groups],
            "rlnImageDimensionality": [2] * g,
            "rlnVoltage": [microscope.voltage_kv] * g,
            "rlnSphericalAberration": [microscope.cs_mm] * g,
            "rlnAmplitudeContrast": [microscope.amplitude_contrast] * g,
            **{name: values * g for name, values in microscope.optics_columns().items()},
        }
    )


def _input_particles(parts: pd.DataFrame, mics: MicrographDraws | None) -> pd.DataFrame:
    """particles_noposes.star's table: no poses, no truth labels, and with micrographs each particle's micrograph's
    defocus (what CTF estimation gives), not its own."""
    table = without_poses(parts).drop(columns=[TRUTH_CLASS_COLUMN], errors="ignore")
    if mics is not None and "rlnDefocusU" in table:
        for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            table[col] = mics.table[col].to_numpy()[mics.of_particle]
    return table


def simulate_particles(
    truth: torch.Tensor,
    angpix: float,
    out_dir,
    n: int,
    snr: float = 0.05,
    defocus_min_angst: float = 10000.0,
    defocus_max_angst: float = 25000.0,
    astigmatism_angst: float = 300.0,
    max_shift_angst: float = 5.0,
    seed: int = 0,
    microscope: Microscope = Microscope(),
    batch: int = 256,
    device=None,
    ctf: bool = True,
    noise_sigma: float | None = None,
    micrographs: Micrographs | None = None,
    noise_model: NoiseModel | None = None,
    junk: Junk | None = None,
    preferred_view: PreferredView | None = None,
    more_groups: Sequence[tuple[torch.Tensor, float]] = (),
) -> dict:
    """Write out_dir/particles.star (with the true poses), particles_noposes.star (without them: the input of a
    refinement), particles.mrcs and truth.mrc; return a summary dict.

    SNR = (mean variance of the clean images) / (noise variance), the noise white and Gaussian, or with
    ``noise_model`` coloured by its σ² spectra (micrograph m takes its group m mod groups; ``noise_filter``).
    Images and truth are divided by the noise sigma, so the background has unit variance as after relion_preprocess
    (with ``noise_model``: the model's σ², the signal scaled to the SNR against it), and the truth map stays on the
    particles' greyscale.

    ``micrographs``: rlnMicrographName, per-micrograph defocus and signal scale (``Micrographs``); particles.star has
    each particle's true defocus, particles_noposes.star its micrograph's (what CTF estimation gives), and
    micrographs_truth.star each micrograph's defocus and true scale. ``junk``: particles replaced by junk, marked
    rlnClassNumber 2 (the particles 1) in particles.star only. ``preferred_view``: directions concentrated about +z.
    ``more_groups``: each further optics group's truth map, at its box and pixel size and made independently of any
    resampling (from the atomic model), with its pixel size (Å). The particles are divided evenly among the groups
    (whole micrographs with ``micrographs``), each group's images in a stack of their own,
    particles_opticsGroupG.mrcs; truth.mrc is the first group's map. The scope's aberrations apply to every group.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = [(truth, angpix), *more_groups]
    g = torch.Generator().manual_seed(seed)
    rot, tilt, psi, ox, oy = random_poses(n, max_shift_angst, g, preferred_view, _stream(seed, 1))
    defocus_range = (defocus_min_angst, defocus_max_angst, astigmatism_angst)
    mics = None if micrographs is None else draw_micrographs(micrographs, n, *defocus_range, g)
    du, dv, dang = random_defocus(n, *defocus_range, g) if mics is None else mics.defocus
    draws = {"rot": rot, "tilt": tilt, "psi": psi, "ox": ox, "oy": oy, "du": du, "dv": dv, "dang": dang}
    group, mic_group = _optics_groups(n, len(maps), mics)
    of_micrograph = np.zeros(n, dtype=int) if mics is None else mics.of_particle
    filters = [None if noise_model is None else noise_filter(noise_model, v.shape[-1], a) for v, a in maps]
    first_filter = filters[0]
    grey = _Greyscale(snr, noise_sigma, 1.0 if first_filter is None else float(first_filter[1][0]) ** 0.5)
    is_junk = None if junk is None else junk_mask(n, junk.fraction, _stream(seed, 2))
    scale = None if mics is None else torch.from_numpy(mics.table["rlnGroupScaleCorrection"].to_numpy()[of_micrograph])
    noise_group = of_micrograph % (1 if noise_model is None else len(noise_model.names))
    names: list[str] = []
    for k, ((volume, pix), filt) in enumerate(zip(maps, filters)):
        first, count = int(np.searchsorted(group, k)), int((group == k).sum())
        stack = out / ("particles.mrcs" if len(maps) == 1 else f"particles_opticsGroup{k + 1}.mrcs")
        junk_map = None
        if junk is not None and junk.maps is not None:  # as strong as a particle: the truth map's power
            other = junk.maps[k] * (volume.norm() / junk.maps[k].norm())
            junk_map = _projector(other, pix, microscope, ctf, device)
        extras = _Extras(scale, is_junk, noise_group, junk_map)
        amplitudes = None if filt is None else filt[0].to(torch.float32)
        project = _projector(volume, pix, microscope, ctf, device)
        _write_group_stack(stack, range(first, first + count), project, extras, draws, amplitudes, grey, g, batch)
        names += _image_names(stack, count)
    assert grey.grey is not None  # set by the first batch (n > 0)
    write_map(out / "truth.mrc", (truth / grey.grey).cpu().numpy().astype(np.float32), angpix)
    optics = _optics_table(microscope, [(a, v.shape[-1]) for v, a in maps])
    parts = _particles_table(names, draws, group, ctf)
    if mics is not None and mic_group is not None:
        parts.insert(1, "rlnMicrographName", mics.table["rlnMicrographName"].to_numpy()[mics.of_particle])
        _write_micrographs_truth(out, mics.table, mic_group, noise_model, ctf)
    if is_junk is not None:
        parts[TRUTH_CLASS_COLUMN] = np.where(is_junk, JUNK_CLASS, 1)
    write_star(out / "particles.star", {"optics": optics, "particles": parts})
    write_star(out / NO_POSES_STAR, {"optics": optics, "particles": _input_particles(parts, mics)})
    return {"n": n, "box": truth.shape[-1], "angpix": angpix, "snr": snr, "noise_sigma": grey.noise_sigma}


def _optics_groups(n: int, groups: int, mics: MicrographDraws | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each particle's optics group (n,) and each micrograph's (m,) (None without micrographs), 0-based: the particles,
    or with micrographs whole micrographs, divided evenly; a group's particles are a contiguous run."""
    if mics is None:
        return contiguous_runs(n, groups), None
    mic_group = contiguous_runs(len(mics.table), groups)
    return mic_group[mics.of_particle], mic_group


def _particles_table(names: list[str], draws: dict[str, torch.Tensor], group: np.ndarray, ctf: bool) -> pd.DataFrame:
    """The truth particles.star's table: image names, true poses (°, Å), CTFs (without ``ctf``: none), optics groups
    (``group`` (n,) 0-based) and half sets."""
    n = len(names)
    parts = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnAngleRot": draws["rot"].numpy(),
            "rlnAngleTilt": draws["tilt"].numpy(),
            "rlnAnglePsi": draws["psi"].numpy(),
            "rlnOriginXAngst": draws["ox"].numpy(),
            "rlnOriginYAngst": draws["oy"].numpy(),
            "rlnDefocusU": draws["du"].numpy(),
            "rlnDefocusV": draws["dv"].numpy(),
            "rlnDefocusAngle": draws["dang"].numpy(),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": group + 1,
            "rlnRandomSubset": (np.arange(n) % 2) + 1,
        }
    )
    if not ctf:
        parts = parts.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor"])
    return parts


def _write_micrographs_truth(
    out: Path, table: pd.DataFrame, mic_group: np.ndarray, noise_model: NoiseModel | None, ctf: bool
) -> None:
    """micrographs_truth.star: each micrograph's name, optics group (``mic_group`` (m,) 0-based), defocus (without
    ``ctf``: none), true scale, and with ``noise_model`` the name of the model's group whose σ² its noise has."""
    truth = table.copy()
    truth.insert(1, "rlnOpticsGroup", mic_group + 1)
    if not ctf:
        truth = truth.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    if noise_model is not None:
        truth["rlnGroupName"] = [noise_model.names[m % len(noise_model.names)] for m in range(len(table))]
    write_star(out / MICROGRAPHS_TRUTH_STAR, {"micrographs": truth})


def _image_names(stack: Path, n: int) -> list[str]:
    """rlnImageName of the n images of ``stack``, relative to the directory the command runs in, where RELION's
    programs look for them (it is the project directory)."""
    name = project_relative(stack)
    return [f"{i + 1:06d}@{name}" for i in range(n)]


def _poses_table(poses_star):
    """(optics DataFrame or None, particles DataFrame) of a STAR file of poses (RELION 3.0 or 3.1; no images needed)."""
    from .io.particles import particles_block
    from .io.star import read_star

    blocks = read_star(poses_star)
    _, parts = particles_block(blocks, poses_star)
    parts = parts.reset_index(drop=True)
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        if col not in parts.columns:
            raise CryoInputError(f"missing column {col}; --poses needs the Euler angles of every particle", poses_star)
    if len(parts) == 0:
        raise CryoInputError("no particles in the poses file", poses_star)
    optics = blocks.get("optics")
    aberrations = [c for c in ABERRATION_COLUMNS if optics is not None and c in optics.columns]
    if aberrations:
        raise CryoInputError(
            f"--poses does not apply {aberrations[0]} of data_optics; drop the aberration columns, or simulate "
            "random poses with --beam_tilt/--mag_matrix/--odd_zernike/--even_zernike",
            poses_star,
        )
    return optics, parts


def _per_particle_optics(optics: pd.DataFrame | None, parts: pd.DataFrame, microscope: Microscope, poses_star) -> dict:
    """Voltage, Cs and amplitude contrast of every particle: the optics group's (3.1), the particle's own (3.0), else
    ``microscope``."""
    n = len(parts)
    names = {"voltage": "rlnVoltage", "cs": "rlnSphericalAberration", "q0": "rlnAmplitudeContrast"}
    default = {"voltage": microscope.voltage_kv, "cs": microscope.cs_mm, "q0": microscope.amplitude_contrast}
    out = {}
    for key, col in names.items():
        if optics is not None and col in optics.columns:
            if "rlnOpticsGroup" in parts.columns and "rlnOpticsGroup" in optics.columns:
                groups = numeric_column(optics, "rlnOpticsGroup", "optics", poses_star, whole=True)
                lut = dict(zip(groups, numeric_column(optics, col, "optics", poses_star)))
                of_particle = numeric_column(parts, "rlnOpticsGroup", "particles", poses_star, whole=True)
                unknown = sorted(set(of_particle) - set(lut))
                if unknown:
                    raise CryoInputError(
                        f"rlnOpticsGroup {unknown[0]} of the particles is not in data_optics", poses_star
                    )
                out[key] = np.array([lut[g] for g in of_particle], np.float64)
            else:
                out[key] = np.full(n, numeric_column(optics, col, "optics", poses_star)[0])
        elif col in parts.columns:
            out[key] = numeric_column(parts, col, "particles", poses_star)
        else:
            out[key] = np.full(n, default[key])
    return out


def _check_optics_match_map(optics: pd.DataFrame | None, box: int, angpix: float, poses_star) -> None:
    """The poses' optics table, where it gives a box or pixel size, must agree with the map's."""

    if optics is None:
        return
    if "rlnImageSize" in optics.columns and (optics["rlnImageSize"].astype(int) != box).any():
        raise CryoInputError(
            f"rlnImageSize {sorted(set(optics['rlnImageSize'].astype(int)))} of the poses differs from the map "
            f"box {box}",
            poses_star,
        )
    if (
        "rlnImagePixelSize" in optics.columns
        and (np.abs(optics["rlnImagePixelSize"].astype(float) - angpix) > 1e-3 * angpix).any()
    ):
        raise CryoInputError(
            f"rlnImagePixelSize {sorted(set(optics['rlnImagePixelSize'].astype(float)))} of the poses differs "
            f"from the map's {angpix:.4f} Å",
            poses_star,
        )


def _pose_columns(
    parts: pd.DataFrame, angpix: float, ctf: bool, optics: pd.DataFrame | None, microscope: Microscope, poses_star
) -> dict[str, np.ndarray]:
    """Per-particle float64 arrays: Euler angles (°), origins (Å), and with ``ctf`` (where the STAR has defocus) the
    CTF's parameters with each particle's voltage, Cs and amplitude contrast."""

    def col(name, default=0.0):
        return numeric_column(parts, name, "particles", poses_star, default)

    cols = {"rot": col("rlnAngleRot"), "tilt": col("rlnAngleTilt"), "psi": col("rlnAnglePsi")}
    if "rlnOriginXAngst" in parts.columns or "rlnOriginYAngst" in parts.columns:
        cols |= {"ox": col("rlnOriginXAngst"), "oy": col("rlnOriginYAngst")}
    else:
        cols |= {"ox": col("rlnOriginX") * angpix, "oy": col("rlnOriginY") * angpix}
    if ctf and "rlnDefocusU" in parts.columns:
        du = col("rlnDefocusU")
        mic = _per_particle_optics(optics, parts, microscope, poses_star)
        cols |= {
            "du": du,
            "dv": col("rlnDefocusV") if "rlnDefocusV" in parts.columns else du.copy(),
            "dang": col("rlnDefocusAngle"),
            "voltage": mic["voltage"],
            "cs": mic["cs"],
            "q0": mic["q0"],
            "phase": col("rlnPhaseShift"),
            "bfac": col("rlnCtfBfactor"),
            "cscale": col("rlnCtfScalefactor", 1.0),
        }
    return cols


def _write_projected_stars(
    out: Path, stack_name: str, parts: pd.DataFrame, optics, microscope: Microscope, box: int, angpix: float
) -> None:
    """particles.star (every input column, the image names of the new stack) and particles_noposes.star."""
    n = len(parts)
    star = parts.drop(columns=["rlnImageName"], errors="ignore")
    star.insert(0, "rlnImageName", _image_names(out / stack_name, n))
    if optics is None:
        optics = pd.DataFrame(
            {
                "rlnOpticsGroupName": ["opticsGroup1"],
                "rlnOpticsGroup": [1],
                "rlnVoltage": [microscope.voltage_kv],
                "rlnSphericalAberration": [microscope.cs_mm],
                "rlnAmplitudeContrast": [microscope.amplitude_contrast],
            }
        )
        star["rlnOpticsGroup"] = 1
    optics = optics.copy()
    optics["rlnImagePixelSize"], optics["rlnImageSize"], optics["rlnImageDimensionality"] = angpix, box, 2
    write_star(out / "particles.star", {"optics": optics, "particles": star})
    write_star(out / NO_POSES_STAR, {"optics": optics, "particles": without_poses(star)})


def project_poses(
    truth: torch.Tensor,
    angpix: float,
    out_dir,
    poses_star,
    snr: float = 0.0,
    seed: int = 0,
    batch: int = 256,
    device=None,
    ctf: bool = True,
    microscope: Microscope = Microscope(),
    stack_name: str = "particles.mrcs",
) -> dict:
    """Project ``truth`` at the poses, CTFs and origin offsets of ``poses_star``; write out_dir/particles.{mrcs,star}.

    The poses file is RELION 3.0 or 3.1 (e.g. bench/make_bench_data.py's poses.star, or any refinement's data.star):
    Euler angles, rlnOriginX/YAngst (or rlnOriginX/Y in pixels), and where present rlnDefocusU/V/Angle, rlnPhaseShift,
    rlnCtfBfactor, rlnCtfScalefactor with the optics group's voltage, Cs and amplitude contrast. As relion_project
    --ang --ctf does, with the same conventions as ``simulate_particles``. The stack is float32, written batch by batch
    into a memory-mapped file (nothing of the size of the stack is held in memory). particles.star keeps every input
    column (the poses are the truth) and adds rlnImageName; particles_noposes.star is the same without the poses.

    ``snr`` > 0 adds white Gaussian noise of variance (mean clean-image variance of the first batch) / snr, drawn on
    ``device`` from ``seed``; the images are not rescaled, so ``truth`` stays on their greyscale. ``snr`` = 0: clean
    images (add noise afterwards, e.g. with bench/add_noise.py).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = truth.shape[-1]
    optics, parts = _poses_table(poses_star)
    _check_optics_match_map(optics, box, angpix, poses_star)
    n = len(parts)
    cols = _pose_columns(parts, angpix, ctf, optics, microscope, poses_star)
    ctf = "du" in cols
    transform = prepare_padded_transform(truth.to(device=device, dtype=torch.float32), 2)
    ky, kx = rfft_freqs_2d(box, device, torch.float64)
    gen = torch.Generator(device=transform.f_padded.device).manual_seed(seed) if snr > 0 else None
    noise_sigma = None
    signal_var = None
    writer = StackWriter(out / stack_name, n, box, angpix)
    try:
        for start in range(0, n, batch):
            b = {k: torch.tensor(np.ascontiguousarray(v[start : start + batch]), dtype=torch.float64, device=device)
                 for k, v in cols.items()}  # fmt: skip
            A = euler_to_matrix(b["rot"], b["tilt"], b["psi"]).to(torch.float32)
            c = None
            if ctf:
                c = compute_ctf(
                    ky, kx, box, angpix, b["du"], b["dv"], b["dang"], b["voltage"], b["cs"], b["q0"], b["phase"],
                    b["bfac"], b["cscale"],
                ).to(torch.float32)  # fmt: skip
            origin_px = (torch.stack([b["ox"], b["oy"]], -1) / angpix).to(torch.float32)
            img = irfft2_centered(particle_image_rfft(transform, A, origin_px, c, box), box)
            if noise_sigma is None:
                signal_var = float(img.var(dim=(-2, -1)).mean())
                noise_sigma = (signal_var / snr) ** 0.5 if snr > 0 else 0.0
            if snr > 0:
                img = img + torch.randn(img.shape, generator=gen, device=img.device, dtype=img.dtype) * noise_sigma
            writer.write(start, img.cpu().numpy())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    _write_projected_stars(out, stack_name, parts, optics, microscope, box, angpix)
    return {
        "n": n,
        "box": box,
        "angpix": angpix,
        "snr": snr,
        "noise_sigma": noise_sigma,
        "clean_variance": signal_var,
        "ctf": bool(ctf),
        "stack": str(out / stack_name),
        "stack_bytes": 1024 + n * box * box * 4,
    }
