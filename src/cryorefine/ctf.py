"""RELION's contrast transfer function (src/ctf.h), batched over particles on tensors.

CTF(u) = -scale · sin(K1·Δf(φ)·u² + K2·u⁴ − K5 − K3) · exp(−B·u²/4), with
Δf(φ) = −(U+V)/2 − (U−V)/2 · cos(2(φ − azimuth)), K1 = πλ, K2 = π/2·Cs·λ³, K3 = atan(Q0/√(1−Q0²)),
K5 the phase shift; u in 1/Å, λ in Å, Cs in Å. Positive (= Q0) at the origin.
"""

from __future__ import annotations

import math

import torch


def electron_wavelength_angst(voltage_kv: torch.Tensor) -> torch.Tensor:
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


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
) -> torch.Tensor:
    """CTF at integer frequencies ky_px, kx_px (any shape F) of a box of ``box`` pixels of ``angpix`` Å.

    Each parameter is (n,) or a scalar; returns (n, *F).
    """
    dtype = ky_px.dtype
    dev = ky_px.device

    def per_particle(x):
        t = torch.as_tensor(x, dtype=dtype, device=dev)
        return t.reshape(-1, *([1] * ky_px.dim()))

    to_per_angst = 1.0 / (box * per_particle(angpix))
    ky_per_angst, kx_per_angst = ky_px * to_per_angst, kx_px * to_per_angst

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
    ctf = -torch.sin(gamma)
    b = per_particle(bfactor_angst2)
    ctf = ctf * torch.exp(-b * u2 / 4.0) * per_particle(scale)
    return ctf


def ctf_for_particles(particles, indices, ky_px, kx_px, box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """CTF (n, *freq_shape) for particles ``indices`` of a ParticleTable at integer frequencies (ky_px, kx_px)."""
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
    ctf = compute_ctf(
        ky_px.to(device=device, dtype=torch.float64), kx_px.to(device=device, dtype=torch.float64), box, *cols
    )
    return ctf.to(dtype)
