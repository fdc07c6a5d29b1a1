"""Simulated particle sets with known truth: projections of a map with CTF, shifts and Gaussian noise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .ctf import compute_ctf
from .fourier.grids import irfft2_centered, rfft_freqs_2d
from .fourier.shift import shift_images_rfft
from .geometry.euler import euler_to_matrix
from .io.mrc import StackWriter, write_map
from .io.star import write_star
from .projection.extract import prepare_padded_transform, project_rfft


@dataclass(frozen=True)
class Microscope:
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1


def random_poses(n: int, max_shift_angst: float, generator: torch.Generator):
    """Uniform rotations over SO(3) (ZYZ: rot, psi uniform, cos(tilt) uniform) and shifts uniform in a disc."""
    rot = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    tilt = torch.rad2deg(torch.acos(torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1))
    psi = torch.rand(n, generator=generator, dtype=torch.float64) * 360 - 180
    radius = max_shift_angst * torch.sqrt(torch.rand(n, generator=generator, dtype=torch.float64))
    phi = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * np.pi
    return rot, tilt, psi, radius * torch.cos(phi), radius * torch.sin(phi)


def particle_image_rfft(transform, rotations, origin_px, ctf, box: int):
    """Clean particle transforms (n, d, d//2+1): CTF × projection, moved by the origin offset.

    RELION's rlnOriginX/Y (here in pixels) is the shift that brings the particle back onto the centre,
    so the particle itself sits at -origin.
    """
    f = project_rfft(transform, rotations)
    if ctf is not None:
        f = f * ctf
    return shift_images_rfft(f, -origin_px, box)


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
    """Write out_dir/particles.star, particles.mrcs and truth.mrc; return a summary dict.

    SNR = (mean variance of the clean images) / (noise variance), the noise white and Gaussian.
    Images and truth are divided by the noise sigma, so the background has unit variance as after
    relion_preprocess, and the truth map stays on the particles' greyscale.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = truth.shape[-1]
    g = torch.Generator().manual_seed(seed)
    rot, tilt, psi, ox, oy = random_poses(n, max_shift_angst, g)
    dmean = torch.rand(n, generator=g, dtype=torch.float64) * (defocus_max_angst - defocus_min_angst) + defocus_min_angst
    dastig = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * astigmatism_angst
    du, dv = dmean + dastig / 2, dmean - dastig / 2
    dang = torch.rand(n, generator=g, dtype=torch.float64) * 180
    transform = prepare_padded_transform(truth.to(device=device, dtype=torch.float32), 2)
    ky, kx = rfft_freqs_2d(box, device, torch.float32)
    grey = None
    writer = StackWriter(out / "particles.mrcs", n, box, angpix)
    try:
        for start in range(0, n, batch):
            sl = slice(start, min(start + batch, n))
            A = euler_to_matrix(rot[sl], tilt[sl], psi[sl]).to(device=device, dtype=torch.float32)
            c = None
            if ctf:
                c = compute_ctf(ky, kx, box, angpix, du[sl], dv[sl], dang[sl], microscope.voltage_kv, microscope.cs_mm, microscope.amplitude_contrast).to(torch.float32)
            origin_px = (torch.stack([ox[sl], oy[sl]], -1) / angpix).to(device=device, dtype=torch.float32)
            clean = irfft2_centered(particle_image_rfft(transform, A, origin_px, c, box), box)
            if noise_sigma is None or grey is None:  # the first batch fixes the noise level for the whole set
                signal_var = float(clean.var(dim=(-2, -1)).mean()) if snr > 0 else 0.0
                if noise_sigma is None:  # else given: several sets on one greyscale
                    noise_sigma = (signal_var / snr) ** 0.5 if snr > 0 else 0.0
                grey = noise_sigma if noise_sigma > 0 else 1.0
            noise = torch.randn(clean.shape, generator=g, dtype=torch.float32).to(device) * noise_sigma
            writer.write(start, ((clean + noise) / grey).cpu().numpy())
        writer.close()
    except BaseException:
        writer.abort() if hasattr(writer, "abort") else None
        raise
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
        }
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
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
    return {"n": n, "box": box, "angpix": angpix, "snr": snr, "noise_sigma": noise_sigma}
