"""RELION's contrast transfer function (src/ctf.h), batched over particles on tensors.

CTF(u) = -scale · sin(K1·Δf(φ)·u² + K2·u⁴ − K5 − K3) · exp(−B·u²/4), with
Δf(φ) = −(U+V)/2 − (U−V)/2 · cos(2(φ − azimuth)), K1 = πλ, K2 = π/2·Cs·λ³, K3 = atan(Q0/√(1−Q0²)),
K5 the phase shift; u in 1/Å, λ in Å, Cs in Å. Positive (= Q0) at the origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .optics import IDENTITY_MAG, electron_wavelength_angst, even_zernike_index, magnified, zernike_sum


@dataclass(frozen=True)
class CtfOptions:
    """RELION's run-wide CTF flags (getFftwImage): they change the CTF of the E-step and the back-projection alike."""

    intact_first_peak: bool = False  # --ctf_intact_first_peak: 1 where |γ| < π/2
    phase_flipped: bool = False  # --ctf_phase_flipped (the images were phase-flipped): |CTF|
    only_flip_phases: bool = False  # --only_flip_phases: sign(CTF), no envelope


PLAIN_CTF = CtfOptions()


def compute_ctf(
    ky_px: torch.Tensor,
    kx_px: torch.Tensor,
    box: int,
    angpix: torch.Tensor | float,
    defocus_u_angst: torch.Tensor,
    defocus_v_angst: torch.Tensor,
    defocus_angle_deg: torch.Tensor,
    voltage_kv: torch.Tensor | float,
    cs_mm: torch.Tensor | float,
    amplitude_contrast: torch.Tensor | float,
    phase_shift_deg: torch.Tensor | float = 0.0,
    bfactor_angst2: torch.Tensor | float = 0.0,
    scale: torch.Tensor | float = 1.0,
    *,
    mag: tuple[float, float, float, float] = IDENTITY_MAG,
    even_zernike: tuple[float, ...] = (),
    options: CtfOptions = PLAIN_CTF,
) -> torch.Tensor:
    """CTF at integer frequencies ky_px, kx_px (any shape F) of a box of ``box`` pixels of ``angpix`` Å.

    Each parameter is (n,) or a scalar; returns (n, *F). ``mag`` (the optics group's magnification matrix) and
    ``even_zernike`` (its even aberrations, added to γ) as RELION's (optics.py): the CTF is evaluated at k' = M·k.
    """
    dtype = ky_px.dtype
    dev = ky_px.device

    def per_particle(x):
        t = torch.as_tensor(x, dtype=dtype, device=dev)
        return t.reshape(-1, *([1] * ky_px.dim()))

    to_per_angst = 1.0 / (box * per_particle(angpix))
    kx_per_angst, ky_per_angst = magnified(kx_px * to_per_angst, ky_px * to_per_angst, mag)

    du, dv, ang = per_particle(defocus_u_angst), per_particle(defocus_v_angst), per_particle(defocus_angle_deg)
    lam = electron_wavelength_angst(per_particle(voltage_kv))
    cs_angst = per_particle(cs_mm) * 1e7
    q0 = per_particle(amplitude_contrast)
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * cs_angst * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    k5 = torch.deg2rad(per_particle(phase_shift_deg))
    u2 = kx_per_angst**2 + ky_per_angst**2
    phi = torch.atan2(ky_per_angst, kx_per_angst)
    deltaf = -(du + dv) * 0.5 - (du - dv) * 0.5 * torch.cos(2.0 * (phi - torch.deg2rad(ang)))
    gamma = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    if even_zernike:
        gamma = gamma + zernike_sum(even_zernike, even_zernike_index, kx_per_angst, ky_per_angst)
    ctf = -torch.sin(gamma)
    if options.intact_first_peak:
        ctf = torch.where(gamma.abs() < math.pi / 2, torch.ones_like(ctf), ctf)
    b = per_particle(bfactor_angst2)
    ctf = ctf * torch.exp(-b * u2 / 4.0)
    if options.phase_flipped:
        ctf = ctf.abs()
    elif options.only_flip_phases:
        ctf = torch.where(ctf >= 0, 1.0, -1.0).to(ctf.dtype)
    return ctf * per_particle(scale)


def ctf_for_particles(
    particles, indices, ky_px, kx_px, box: int, device=None, dtype=torch.float32, options: CtfOptions = PLAIN_CTF
) -> torch.Tensor:
    """CTF (n, *freq_shape) for particles ``indices`` of a ParticleTable at integer frequencies (ky_px, kx_px), with
    each optics group's magnification and even aberrations."""
    import numpy as np

    from .transfer import to_device

    idx = np.asarray(indices)
    og = particles.optics_group[idx]
    optics = particles.optics

    # every per-particle parameter in one host-to-device copy (each copy of a host array waits for the device)
    per_group = lambda name: np.array([getattr(o, name) for o in optics], dtype=np.float64)[og]  # noqa: E731
    params = np.stack(
        [
            per_group("angpix"),
            particles.defocus_u_angst[idx],
            particles.defocus_v_angst[idx],
            particles.defocus_angle_deg[idx],
            per_group("voltage_kv"),
            per_group("cs_mm"),
            per_group("amplitude_contrast"),
            particles.phase_shift_deg[idx],
            particles.ctf_bfactor[idx],
            particles.ctf_scale[idx],
        ]
    ).astype(np.float64)
    cols = to_device(params, device).unbind(0)
    ky, kx = ky_px.to(device=device, dtype=torch.float64), kx_px.to(device=device, dtype=torch.float64)
    if all(o.mag == IDENTITY_MAG and not o.even_zernike for o in optics):
        return compute_ctf(ky, kx, box, *cols, options=options).to(dtype)
    ctf = torch.empty((len(idx), *ky.shape), dtype=torch.float64, device=ky.device)
    for g in np.unique(og):
        rows = to_device(np.flatnonzero(og == g), device)
        o = optics[int(g)]
        ctf[rows] = compute_ctf(
            ky, kx, box, *(c[rows] for c in cols), mag=o.mag, even_zernike=o.even_zernike, options=options
        )
    return ctf.to(dtype)
