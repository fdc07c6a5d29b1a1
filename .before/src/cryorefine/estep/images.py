"""getFourierTransformsAndCTFs: a batch of particles as Fourier pixels of the E-step window, with CTF and 1/σ²."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..ctf import PLAIN_CTF, CtfOptions, ctf_for_particles
from ..fourier.filters import soft_mask_outside_map
from ..fourier.grids import (
    counted_once_2d,
    irfft2_centered,
    rfft2_centered,
    shell_index_2d,
    sorted_shell_sums,
)
from ..fourier.shift import phase_shift_factors
from ..io.table import ParticleTable, read_images
from ..optics import IDENTITY_MAG, demodulation_factors, magnified
from ..transfer import to_device

MASK_EDGE_PX = 5.0  # RELION's width_mask_edge


@dataclass
class Window:
    """Fourier pixels of the E-step: rfft half plane, 0 < shell <= max_shell, sorted by shell (coarse = prefix)."""

    flat_index: torch.Tensor  # (j,)
    ky: torch.Tensor  # (j,) detector frame, pixels: the images' shifts, masks and shells
    kx: torch.Tensor
    shell: torch.Tensor
    box: int
    map_k: tuple[torch.Tensor, torch.Tensor] | None = None  # (ky, kx) in the map's frame (optics.magnified), if not k
    map_scale: float = 1.0  # the map's pixels per detector pixel: an optics group of another box or pixel size's

    @property
    def map_ky(self) -> torch.Tensor:
        """(j,) the frequencies the pixels sample in the map (projection, back-projection): M·k with an optics
        group's anisotropic magnification, else the detector's."""
        return self.ky if self.map_k is None else self.map_k[0]

    @property
    def map_kx(self) -> torch.Tensor:
        return self.kx if self.map_k is None else self.map_k[1]

    def in_map_frame(self, mag: tuple[float, float, float, float], scale: float = 1.0) -> "Window":
        """The window for the particles of an optics group with magnification matrix ``mag`` whose box spans
        1/``scale`` of the map's (RELION's applyScaleDifference: box·Å/px of the map over the group's): the map's
        frequency (its pixels) of detector pixel k is scale·M·k."""
        if mag == IDENTITY_MAG and scale == 1.0:
            return self
        kx, ky = magnified(self.kx, self.ky, mag)
        return replace(self, map_k=(ky * scale, kx * scale), map_scale=scale)

    @property
    def map_shell(self) -> torch.Tensor:
        """(j,) the map's shell of each pixel, where the model's per-shell figures (the classes' SSNR) are read: RELION
        remaps an image shell i of another optics group to round(i · map_scale)."""
        if self.map_scale == 1.0:
            return self.shell
        if "_map_shell" not in self.__dict__:
            self._map_shell = torch.round(self.shell * self.map_scale).to(self.shell.dtype)
        return self._map_shell

    def map_prefix(self, map_shell: int) -> int:
        """Number of leading pixels with a map shell <= ``map_shell`` (sorted by shell, the pixels are by map shell
        too)."""
        if self.map_scale == 1.0:
            return self.prefix(map_shell)
        if "_map_shell_host" not in self.__dict__:
            self._map_shell_host = self.map_shell.cpu().numpy()
        return int(np.searchsorted(self._map_shell_host, map_shell, side="right"))

    @classmethod
    def build(cls, box: int, max_shell: int, device=None) -> "Window":
        from ..fourier.grids import window_pixels_2d

        idx, ky, kx, shell = window_pixels_2d(box, max_shell, device)
        return cls(idx, ky.float(), kx.float(), shell, box)

    @property
    def scored(self) -> torch.Tensor:
        """(j,) 1 for the pixels the scores and the noise statistics use, 0 on the redundant kx = 0, ky < 0 half column
        (fourier.grids.counted_once_2d; back-projection still uses every pixel)."""
        if "_scored" not in self.__dict__:
            self._scored = counted_once_2d(self.box, self.ky.device).flatten()[self.flat_index].to(self.ky.dtype)
        return self._scored

    def in_circle(self, shell: int) -> torch.Tensor:
        """(j,) 1 for the pixels with kx² + ky² <= shell², else 0: where RELION's Projector and BackProjector work for
        an image of size 2·shell (r_max), while its scores and σ² count every pixel whose shell rounds to <= shell.
        Between the two (shell < |k| < shell + ½) the projection is zero: the image's power enters the scores, σ² and
        --norm there, and nothing is back-projected."""
        cache = self.__dict__.setdefault("_in_circle", {})
        if shell not in cache:
            cache[shell] = ((self.kx**2 + self.ky**2) <= shell * shell).to(self.ky.dtype)
        return cache[shell]

    def _host_shells(self) -> np.ndarray:
        """A host copy of the shells, made once (no device sync in the hot path)."""
        if "_shell_host" not in self.__dict__:
            self._shell_host = self.shell.cpu().numpy()
        return self._shell_host

    def shell_of_prefix(self, j: int) -> int:
        """The shell of the last of the leading ``j`` pixels (host side: no device sync)."""
        return int(self._host_shells()[j - 1]) if j > 0 else 0

    def prefix(self, max_shell: int) -> int:
        """Number of leading pixels with shell <= max_shell."""
        return int(np.searchsorted(self._host_shells(), max_shell, side="right"))

    def shell_sums(self, values: torch.Tensor, n_shells: int) -> torch.Tensor:
        """(m, n_shells) Σ of ``values`` (m, j) over each shell's pixels, shells past n_shells − 1 counted in the
        last (fourier.grids.sorted_shell_sums)."""
        cache = self.__dict__.setdefault("_shell_ends", {})
        if n_shells not in cache:  # pixels with shell <= s, for each s; all of them for the last
            ends = torch.searchsorted(self.shell, torch.arange(n_shells, device=self.shell.device), right=True)
            ends[-1] = self.size
            cache[n_shells] = ends
        return sorted_shell_sums(values, cache[n_shells])

    def beyond(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rfft pixels past the window up to Nyquist, each conjugate pair once (fourier.grids.counted_once_2d), by
        shell: (flat_index (b,), the number of them in shells <= s (d//2+1,) for sorted_shell_sums, pixels per shell
        (d//2+1,) float64); made once per window."""
        if "_beyond" not in self.__dict__:
            S = self.box // 2 + 1
            shells = shell_index_2d(self.box, self.shell.device).flatten()
            idx = torch.nonzero(
                (shells > self.max_shell) & (shells < S) & counted_once_2d(self.box, self.shell.device).flatten()
            ).squeeze(1)
            idx = idx[torch.argsort(shells[idx], stable=True)]
            ends = torch.searchsorted(shells[idx], torch.arange(S, device=idx.device), right=True)
            npix = torch.diff(ends, prepend=ends.new_zeros(1)).to(torch.float64)
            self._beyond = (idx, ends, npix)
        return self._beyond

    def phase_shift_factors(self, offsets_px: torch.Tensor, j: int) -> torch.Tensor:
        """exp(−2πi k·s/d) of the first ``j`` pixels for offsets (..., 2) (x, y) px: (..., j) complex."""
        return phase_shift_factors(self.ky[:j], self.kx[:j], offsets_px, self.box)

    @property
    def max_shell(self) -> int:
        shells = self._host_shells()
        return int(shells[-1]) if shells.size else 0

    @property
    def size(self) -> int:
        return self.flat_index.numel()


@dataclass
class ImageBatch:
    indices: np.ndarray  # (n,) particle rows
    f_masked: torch.Tensor  # (n, j) complex: masked image, for the alignment, σ², the scale and --norm (as RELION)
    f_unmasked: torch.Tensor  # (n, j) complex: for the reconstruction
    ctf: torch.Tensor  # (n, j) real (ones without CTF): what the E-step multiplies the references by (CTF²
    # where the data are CTF-premultiplied)
    inv_sigma2: torch.Tensor  # (n, j) real: 1/σ² of the particle's noise group at each pixel
    scale: torch.Tensor  # (n,) intensity scale of the particle's micrograph group (RELION's scale_correction)
    old_offset_px: torch.Tensor  # (n, 2) previous origin offset (x, y) in pixels
    group: torch.Tensor  # (n,) noise (optics) group index
    scale_group: torch.Tensor  # (n,) scale (micrograph) group index
    power_outside: torch.Tensor | None = (
        None  # (n,) Σ|X|² of the masked image's pixels beyond the window, up to Nyquist
    )
    spectrum_outside: torch.Tensor | None = None  # (n, d//2+1) that power per shell (0 inside the window)
    bp_ctf: torch.Tensor | None = None  # (n, j) the CTF back-projection multiplies the image by, if not ``ctf``
    offset_prior_px: torch.Tensor | None = None  # (n, 2) centre of the offset prior (rlnOriginX/YPriorAngst), None: 0
    # (1 for CTF-premultiplied data, the CTF for the others)

    def __len__(self):
        return len(self.indices)

    def rows(self, rows: slice) -> "ImageBatch":
        """The particles ``rows`` (a slice: every tensor is a view, nothing is copied)."""
        views: dict[str, Any] = {k: (None if v is None else v[rows]) for k, v in vars(self).items()}
        return ImageBatch(**views)


def noise_images(sigma2_shells: torch.Tensor, box: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """(n, d, d) real Gaussian noise with per-component Fourier variance σ² (n, shells) per shell."""
    shells = shell_index_2d(box, device).clamp(max=sigma2_shells.shape[1] - 1)
    sd = torch.sqrt(sigma2_shells[:, shells].clamp(min=0)).float()  # (n, d, d//2+1)
    noise = to_device(torch.randn((2, *sd.shape), generator=generator, dtype=torch.float32), device)
    return irfft2_centered(torch.complex(noise[0] * sd, noise[1] * sd), box)


def ctf_and_inverse_noise(
    table: ParticleTable,
    indices: np.ndarray,
    group: torch.Tensor,
    window: Window,
    sigma2: torch.Tensor,
    do_ctf: bool,
    device=None,
    ctf_options: CtfOptions = PLAIN_CTF,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The particles' CTF (ones without CTF correction) and 1/σ² of their noise groups ``group`` (n,), both (n, j) on
    the ``window``'s pixels; σ² is (groups, shells) per-component noise variance."""
    if do_ctf and table.has_ctf:
        ctf = ctf_for_particles(table, indices, window.ky, window.kx, window.box, device=device, options=ctf_options)
    else:
        ctf = torch.ones(len(indices), window.size, device=device)
    shells = window.shell.clamp(max=sigma2.shape[1] - 1)
    return ctf, (1.0 / sigma2[group][:, shells].clamp(min=1e-30)).float()


def prepare_batch(
    table: ParticleTable,
    indices: np.ndarray,
    window: Window,
    sigma2: torch.Tensor,
    scale: torch.Tensor,
    particle_diameter_angst: float,
    angpix: float,
    do_ctf: bool,
    zero_mask: bool,
    generator: torch.Generator,
    device=None,
    norm_scale: torch.Tensor | None = None,
    images: np.ndarray | torch.Tensor | None = None,
    old_offsets_angst: np.ndarray | None = None,
    ctf_options: CtfOptions = PLAIN_CTF,
    scale_group: np.ndarray | None = None,
    offset_prior_angst: np.ndarray | None = None,
) -> ImageBatch:
    """Read, mask and transform a batch; σ² is (groups, shells) per-component noise variance; ``scale`` (Gm,) the
    intensity scale of each of the particles' ``scale_group`` (n,) (None: all in group 0).

    ``norm_scale`` (n,): multiplies each image (RELION's avg_norm_correction / rlnNormCorrection, --norm).
    ``images`` (n, d, d) float32: the batch's images if already read (read ahead, or from the GPU's image cache),
    else they are read here. ``old_offsets_angst`` (n, 2): the particles' previous origin offsets (x, y) in Å (the
    refinement's current poses), else the table's. ``offset_prior_angst`` (n, 2): the centres of the offset prior
    (None: 0).
    """
    box = window.box
    imgs = to_device(read_images(table, indices) if images is None else images, device)
    if norm_scale is not None:
        imgs = imgs * to_device(norm_scale, device, imgs.dtype)[:, None, None]
    group = to_device(table.optics_group[indices], device)
    f_full = rfft2_centered(imgs).flatten(1)
    # RELION: outside the particle the background mean (--zero_mask) or noise drawn from σ²
    fill = None if zero_mask else noise_images(sigma2[group], box, generator, device)
    masked = soft_mask_outside_map(imgs, particle_diameter_angst / (2 * angpix), MASK_EDGE_PX, ndim=2, fill=fill)
    f_masked = rfft2_centered(masked).flatten(1)
    # RELION's noise statistics come from the masked image; beyond the window its power spectrum stands in for the
    # residual (storeWeightedSums fills σ² and the norm correction with it), up to Nyquist
    beyond, beyond_ends, _ = window.beyond()
    spectrum_outside = sorted_shell_sums((f_masked[:, beyond].abs() ** 2).double(), beyond_ends)
    ctf, inv_sigma2 = ctf_and_inverse_noise(table, indices, group, window, sigma2, do_ctf, device, ctf_options)
    bp_ctf = None
    premultiplied = np.array([o.ctf_premultiplied for o in table.optics])[table.optics_group[indices]]
    if do_ctf and premultiplied.any():
        pre = to_device(premultiplied, device)[:, None]
        ctf, bp_ctf = torch.where(pre, ctf * ctf, ctf), torch.where(pre, torch.ones_like(ctf), ctf)
    f_masked, f_unmasked = f_masked[:, window.flat_index], f_full[:, window.flat_index]
    phase = demodulation_factors(table.optics, window.ky, window.kx, window.box)
    if phase is not None:
        phase = phase.to(f_masked.device)[group]
        f_masked, f_unmasked = f_masked * phase, f_unmasked * phase
    if old_offsets_angst is None:
        old_offsets_angst = np.stack([table.origin_x_angst[indices], table.origin_y_angst[indices]], -1)
    offsets = np.asarray(old_offsets_angst, dtype=np.float64) / angpix
    sg = to_device(np.zeros(len(indices), np.int64) if scale_group is None else scale_group, device)
    return ImageBatch(
        indices=np.asarray(indices),
        f_masked=f_masked,
        f_unmasked=f_unmasked,
        ctf=ctf,
        inv_sigma2=inv_sigma2,
        scale=to_device(scale, device)[sg].float(),
        old_offset_px=to_device(offsets, device, torch.float32),
        group=group,
        scale_group=sg,
        power_outside=spectrum_outside.sum(1),
        spectrum_outside=spectrum_outside,
        bp_ctf=bp_ctf,
        offset_prior_px=None
        if offset_prior_angst is None
        else to_device(np.asarray(offset_prior_angst) / angpix, device, torch.float32),
    )
