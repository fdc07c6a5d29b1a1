"""Simulated particle sets with known truth: projections of a map with CTF, shifts and Gaussian noise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .projection.extract import prepare_padded_transform, project_rfft
from .ctf import compute_ctf
from .fourier.grids import irfft2_centered, rfft_freqs_2d
from .fourier.shift import shift_images_rfft
from .geometry.euler import euler_to_matrix
from .errors import CryoInputError
from .io.mrc import StackWriter, write_map
from .io.particles import ABERRATION_COLUMNS, numeric_column
from .io.star import write_star
from .io.table import OpticsGroup, project_relative
from .optics import IDENTITY_MAG, demodulation_factors

NO_POSES_STAR = "particles_noposes.star"  # the simulated particles as a user has them: no angles, no origin offsets


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


def random_poses(n: int, max_shift_angst: float, generator: torch.Generator):
    """Uniform rotations over SO(3) (ZYZ: rot, psi uniform, cos(tilt) uniform) and shifts uniform in a disc."""
    rot = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    tilt = torch.rad2deg(torch.acos(torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1))
    psi = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    radius = max_shift_angst * torch.sqrt(torch.rand(n, generator=generator, dtype=torch.float64))
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * np.pi
    return rot, tilt, psi, radius * torch.cos(phi), radius * torch.sin(phi)


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
) -> dict:
    """Write out_dir/particles.star (with the true poses), particles_noposes.star (without them: the input of a
    refinement), particles.mrcs and truth.mrc; return a summary dict.

    SNR = (mean variance of the clean images) / (noise variance), the noise white and Gaussian.
    Images and truth are divided by the noise sigma, so the background has unit variance as after
    relion_preprocess, and the truth map stays on the particles' greyscale.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = truth.shape[-1]
    g = torch.Generator().manual_seed(seed)
    rot, tilt, psi, ox, oy = random_poses(n, max_shift_angst, g)
    dmean = (
        torch.rand(n, generator=g, dtype=torch.float64) * (defocus_max_angst - defocus_min_angst) + defocus_min_angst
    )
    dastig = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * astigmatism_angst
    du, dv = dmean + dastig / 2, dmean - dastig / 2
    dang = torch.rand(n, generator=g, dtype=torch.float64) * 180
    transform = prepare_padded_transform(truth.to(device=device, dtype=torch.float32), 2)
    ky, kx = rfft_freqs_2d(box, device, torch.float32)
    grey = None
    modulation = odd_modulation(microscope, angpix, box, device)
    writer = StackWriter(out / "particles.mrcs", n, box, angpix)
    try:
        for start in range(0, n, batch):
            sl = slice(start, min(start + batch, n))
            A = euler_to_matrix(rot[sl], tilt[sl], psi[sl]).to(device=device, dtype=torch.float32)
            c = None
            if ctf:
                c = compute_ctf(
                    ky,
                    kx,
                    box,
                    angpix,
                    du[sl],
                    dv[sl],
                    dang[sl],
                    microscope.voltage_kv,
                    microscope.cs_mm,
                    microscope.amplitude_contrast,
                    mag=microscope.mag,
                    even_zernike=microscope.even_zernike,
                ).to(torch.float32)
            origin_px = (torch.stack([ox[sl], oy[sl]], -1) / angpix).to(device=device, dtype=torch.float32)
            clean = irfft2_centered(
                particle_image_rfft(transform, A, origin_px, c, box, microscope.mag, modulation), box
            )
            if noise_sigma is None or grey is None:  # the first batch fixes the noise level for the whole set
                signal_var = float(clean.var(dim=(-2, -1)).mean()) if snr > 0 else 0.0
                if noise_sigma is None:  # else given: several sets on one greyscale
                    noise_sigma = (signal_var / snr) ** 0.5 if snr > 0 else 0.0
                grey = noise_sigma if noise_sigma > 0 else 1.0
            noise = torch.randn(clean.shape, generator=g, dtype=torch.float32).to(device) * noise_sigma
            writer.write(start, ((clean + noise) / grey).cpu().numpy())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    assert grey is not None  # set by the first batch (n > 0)
    write_map(out / "truth.mrc", (truth / grey).cpu().numpy().astype(np.float32), angpix)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [angpix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [microscope.voltage_kv],
            "rlnSphericalAberration": [microscope.cs_mm],
            "rlnAmplitudeContrast": [microscope.amplitude_contrast],
            **microscope.optics_columns(),
        }
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": _image_names(out / "particles.mrcs", n),
            "rlnAngleRot": rot.numpy(),
            "rlnAngleTilt": tilt.numpy(),
            "rlnAnglePsi": psi.numpy(),
            "rlnOriginXAngst": ox.numpy(),
            "rlnOriginYAngst": oy.numpy(),
            "rlnDefocusU": du.numpy(),
            "rlnDefocusV": dv.numpy(),
            "rlnDefocusAngle": dang.numpy(),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "rlnRandomSubset": (np.arange(n) % 2) + 1,
        }
    )
    if not ctf:
        parts = parts.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor"])
    write_star(out / "particles.star", {"optics": optics, "particles": parts})
    write_star(out / NO_POSES_STAR, {"optics": optics, "particles": without_poses(parts)})
    return {"n": n, "box": box, "angpix": angpix, "snr": snr, "noise_sigma": noise_sigma}


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
