"""RELION 3.1's optics model beyond the plain CTF (src/jaz/obs_model.cpp, src/ctf.cpp), on tensors.

Frequencies k in 1/Å of the detector frame, x along the image columns, y along the rows. Per optics group:

- Anisotropic magnification M (rlnMagMat00/01/10/11): the detector's pixel k shows the map's frequency k' = M·k. The
  projection, the back-projection, the CTF and the aberrations are all evaluated at k' (RELION's applyAnisoMag:
  A' = M3⁻¹·R, so a Fourier pixel k samples the map at Rᵀ·(M·k, 0)).
- Odd aberrations (rlnOddZernike, with the beam tilt rlnBeamTiltX/Y in mrad folded in as RELION does): the data carry a
  phase exp(iφ(k')), φ = Σ cᵢ·Zᵢ(k'); RELION removes it from the images (demodulatePhase: × exp(−iφ)).
- Even aberrations (rlnEvenZernike): γ(k') += Σ eᵢ·Zᵢ(k') inside the CTF.

Zernike polynomials as RELION's (src/jaz/math/Zernike.cpp): unnormalised, on ρ = |k'| in 1/Å (not a unit disc),
Z(m, n) = R_n^|m|(ρ)·cos(mθ) for m >= 0, R_n^|m|(ρ)·sin(|m|θ) for m < 0; coefficient i is (m, n) of RELION's order
(odd: n = 2k+1 with k = ⌊(√(1+4i) − 1)/2⌋, m = 2(i − k² − k) − n; even: n = 2k with k = ⌊√i⌋, m = 2(i − k² − k)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

IDENTITY_MAG = (1.0, 0.0, 0.0, 1.0)  # (M00, M01, M10, M11)


def electron_wavelength_angst(voltage_kv: torch.Tensor) -> torch.Tensor:
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


def odd_zernike_index(i: int) -> tuple[int, int]:
    """(m, n) of RELION's i-th odd Zernike coefficient: (−1, 1), (1, 1), (−3, 3), (−1, 3), (1, 3), (3, 3), ..."""
    k = int((math.sqrt(1 + 4 * i) - 1) // 2)
    n = 2 * k + 1
    return 2 * (i - k * k - k) - n, n


def even_zernike_index(i: int) -> tuple[int, int]:
    """(m, n) of RELION's i-th even Zernike coefficient: (0, 0), (−2, 2), (0, 2), (2, 2), (−4, 4), ..."""
    k = int(math.isqrt(i))
    return 2 * (i - k * k - k), 2 * k


def zernike(m: int, n: int, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """RELION's unnormalised Zernike polynomial Z(m, n) at frequencies (kx, ky) in 1/Å."""
    rho = torch.sqrt(kx * kx + ky * ky)
    am = abs(m)
    radial = torch.zeros_like(rho)
    for j in range((n - am) // 2 + 1):
        c = (-1) ** j * math.factorial(n - j)
        c /= math.factorial(j) * math.factorial((n + am) // 2 - j) * math.factorial((n - am) // 2 - j)
        radial = radial + c * rho ** (n - 2 * j)
    theta = torch.atan2(ky, kx)
    return radial * (torch.cos(m * theta) if m >= 0 else torch.sin(am * theta))


def odd_coefficients(
    odd: tuple[float, ...], beam_tilt_mrad: tuple[float, float], cs_mm: float, voltage_kv: float
) -> tuple[float, ...]:
    """The odd Zernike coefficients with the beam tilt folded in, as RELION 3.1's ObservationModel does whenever a
    beam tilt is given: s = π·20000·Cs·λ², Z3x = −s·tx/3, Z3y = −s·ty/3; c₁ += 2·Z3x, c₀ += 2·Z3y, c₄ = Z3x,
    c₃ = Z3y (3.1 sets c₃, c₄; the added phase is −s·|k|²·(kx·tx + ky·ty))."""
    tx, ty = beam_tilt_mrad
    if tx == 0.0 and ty == 0.0:
        return tuple(odd)
    c = list(odd) + [0.0] * max(0, 6 - len(odd))
    lam = float(electron_wavelength_angst(torch.tensor(voltage_kv, dtype=torch.float64)))
    s = math.pi * 20000.0 * cs_mm * lam * lam
    z3x, z3y = -s * tx / 3.0, -s * ty / 3.0
    c[1] += 2.0 * z3x
    c[0] += 2.0 * z3y
    c[4], c[3] = z3x, z3y
    return tuple(c)


def zernike_sum(
    coefficients: tuple[float, ...], index: Callable[[int], tuple[int, int]], kx: torch.Tensor, ky: torch.Tensor
) -> torch.Tensor:
    """Σ cᵢ·Z(index(i)) at (kx, ky) in 1/Å; 0 without coefficients."""
    out = torch.zeros_like(kx)
    for i, c in enumerate(coefficients):
        if c != 0.0:
            out = out + c * zernike(*index(i), kx, ky)
    return out


def magnified(
    kx: torch.Tensor, ky: torch.Tensor, mag: tuple[float, float, float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """k' = M·k: the map's frequency that the detector's (kx, ky) shows."""
    m00, m01, m10, m11 = mag
    if mag == IDENTITY_MAG:
        return kx, ky
    return m00 * kx + m01 * ky, m10 * kx + m11 * ky


def demodulation_factors(optics: list, ky_px: torch.Tensor, kx_px: torch.Tensor, box: int) -> torch.Tensor | None:
    """exp(−iφ_g) (groups, j) at the detector pixels (ky_px, kx_px) of a ``box``: RELION's demodulatePhase, which
    removes each optics group's odd aberrations (beam tilt included) from its images; φ_g at the map-frame
    frequencies M·k in 1/Å. ``optics``: the OpticsGroups. None when no group has any."""
    coefficients = [o.odd_phase_coefficients for o in optics]
    if not any(coefficients):
        return None
    rows = []
    for o, c in zip(optics, coefficients):
        per_angst = 1.0 / (box * o.angpix)
        kx, ky = magnified(kx_px.double() * per_angst, ky_px.double() * per_angst, o.mag)
        rows.append(torch.polar(torch.ones_like(kx), -zernike_sum(c, odd_zernike_index, kx, ky)))
    return torch.stack(rows).to(torch.complex64)
