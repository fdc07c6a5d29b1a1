"""The particle table as structure-of-arrays (ParticleTable, OpticsGroup), where its image stacks are found, and image
reads: what every reader of particles (STAR in io/particles.py, cryoSPARC in io/cryosparc.py) builds, with no reader's
imports (so the two readers import this, not each other)."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryorefine.errors import CryoInputError
from cryorefine.io.mrc import ImageStack, all_finite, image_buffer, open_stack
from cryorefine.optics import IDENTITY_MAG, odd_coefficients

MAX_OPEN_STACKS = 128
# What both readers accept for the optics values (a value outside is a damaged or mislabelled file; an amplitude
# contrast above 1 or a voltage <= 0 would turn the CTF into NaN); each rule is quoted in the reader's message.
MIN_ANGPIX, MAX_ANGPIX = 0.01, 1000.0
ANGPIX_RULE = f"must be the pixel size in Å ({MIN_ANGPIX:g} to {MAX_ANGPIX:g})"
MAX_VOLTAGE_KV = 5000.0
VOLTAGE_RULE = f"must be the acceleration voltage in kV (> 0, at most {MAX_VOLTAGE_KV:g})"
MAX_CS_MM = 1000.0
CS_RULE = f"must be the spherical aberration in mm (at most {MAX_CS_MM:g} either way)"
MAX_ORIGIN_ANGST = 1e6  # far beyond any real offset; one of 1e30 Å overflowed the float32 re-centring (a NaN map)
ORIGIN_RULE = f"must be an origin offset in Å (at most {MAX_ORIGIN_ANGST:g} either way)"
AMPLITUDE_CONTRAST_RULE = "must be between 0 and 1"


# each reader's test of the values above (arrays in, boolean arrays out)
def plausible_angpix(v: np.ndarray) -> np.ndarray:
    return (v >= MIN_ANGPIX) & (v <= MAX_ANGPIX)


def plausible_voltage(v: np.ndarray) -> np.ndarray:
    return (v > 0) & (v <= MAX_VOLTAGE_KV)


def plausible_cs(v: np.ndarray) -> np.ndarray:
    return np.abs(v) <= MAX_CS_MM


def plausible_amplitude_contrast(v: np.ndarray) -> np.ndarray:
    return (v >= 0) & (v <= 1)


def plausible_origin(v_angst: np.ndarray) -> np.ndarray:
    return np.abs(v_angst) <= MAX_ORIGIN_ANGST


@dataclass
class OpticsGroup:
    """One row of data_optics."""

    number: int  # rlnOpticsGroup (1-based, as in the file)
    name: str  # rlnOpticsGroupName
    angpix: float  # rlnImagePixelSize (Å/px)
    box: int  # rlnImageSize
    voltage_kv: float  # rlnVoltage
    cs_mm: float  # rlnSphericalAberration
    amplitude_contrast: float  # rlnAmplitudeContrast
    extra: dict = field(default_factory=dict)  # other optics columns (the aberrations too), written back unchanged
    beam_tilt_mrad: tuple[float, float] = (0.0, 0.0)  # rlnBeamTiltX/Y
    odd_zernike: tuple[float, ...] = ()  # rlnOddZernike (RELION's order, optics.py)
    even_zernike: tuple[float, ...] = ()  # rlnEvenZernike
    mag: tuple[float, float, float, float] = IDENTITY_MAG  # rlnMagMat00/01/10/11
    ctf_premultiplied: bool = False  # rlnCtfDataAreCtfPremultiplied
    phase_flipped: bool = False  # rlnCtfDataArePhaseFlipped

    @property
    def odd_phase_coefficients(self) -> tuple[float, ...]:
        """The odd Zernike coefficients of the phase the images carry, beam tilt included (optics.py)."""
        return odd_coefficients(self.odd_zernike, self.beam_tilt_mrad, self.cs_mm, self.voltage_kv)


_PER_PARTICLE = (
    "image_index",
    "image_stack",
    "image_name",
    "rot_deg",
    "tilt_deg",
    "psi_deg",
    "origin_x_angst",
    "origin_y_angst",
    "defocus_u_angst",
    "defocus_v_angst",
    "defocus_angle_deg",
    "phase_shift_deg",
    "ctf_bfactor",
    "ctf_scale",
    "optics_group",
    "random_subset",
    "class_number",
)


@dataclass
class ParticleTable:
    """Per-particle arrays (n,); angles in degrees, offsets and defocus in Å."""

    image_index: np.ndarray  # int64, 0-based index into the stack
    image_stack: np.ndarray  # object: absolute stack paths
    image_name: np.ndarray  # object: original rlnImageName strings
    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    origin_x_angst: np.ndarray
    origin_y_angst: np.ndarray
    defocus_u_angst: np.ndarray
    defocus_v_angst: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    ctf_bfactor: np.ndarray
    ctf_scale: np.ndarray
    optics_group: np.ndarray  # int64, 0-based index into `optics`
    random_subset: np.ndarray  # int64, 0 where absent
    class_number: np.ndarray  # int64, 1 where absent
    optics: list[OpticsGroup]
    extra: pd.DataFrame
    has_ctf: bool
    star_path: str | None = None
    has_angles: bool = False  # the file gave every particle's Euler angles (a refinement's output)
    _stacks: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    read_from: dict = field(default_factory=dict, repr=False, compare=False)  # stack path → a copy read instead
    # working directory → rlnImageName as written from there (io.particles.image_names_from_here, every iteration);
    # not an init field, so that dataclasses.replace starts a table with other names afresh
    names_from: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.image_index)

    def subset(self, mask_or_indices) -> "ParticleTable":
        """A new table with the selected particles (boolean mask or integer indices); shares open stacks."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"mask shape {sel.shape} != ({len(self)},)")
            sel = np.flatnonzero(sel)
        sel = sel.astype(np.int64).reshape(-1)
        arrays = {name: getattr(self, name)[sel] for name in _PER_PARTICLE}
        return replace(self, **arrays, extra=self.extra.iloc[sel].reset_index(drop=True), _stacks=self._stacks)

    @property
    def angpix(self) -> np.ndarray:
        """Per-particle pixel size (Å/px)."""
        return np.array([g.angpix for g in self.optics], np.float64)[self.optics_group]

    @property
    def boxes(self) -> np.ndarray:
        """Per-particle box size (px): optics groups may differ (the map is on the first group's grid)."""
        return np.array([g.box for g in self.optics], np.int64)[self.optics_group]

    @property
    def reference_optics(self) -> OpticsGroup:
        """The first optics group: RELION's map takes its pixel size and box, the other groups' images are mapped onto
        that grid (ObservationModel's scale difference)."""
        return self.optics[0]

    @property
    def box(self) -> int:
        """The image box size (px), shared by all optics groups (for what needs one box: mixed boxes raise)."""
        boxes = sorted({g.box for g in self.optics})
        if len(boxes) != 1:
            raise CryoInputError(
                f"optics groups have different box sizes {boxes}; re-extract all particles with one box size",
                path=self.star_path,
            )
        return boxes[0]

    def stack(self, path: str) -> ImageStack:
        """The open (memory-mapped) stack for a resolved path (or its copy in ``read_from``), opened lazily and
        cached."""
        stack = self._stacks.get(path)
        if stack is None:
            stack = open_stack(self.read_from.get(path, path))
            self._stacks[path] = stack
            while len(self._stacks) > MAX_OPEN_STACKS:
                self._stacks.popitem(last=False)[1].close()
        else:
            self._stacks.move_to_end(path)
        return stack

    def close(self) -> None:
        """Close all cached stacks."""
        while self._stacks:
            self._stacks.popitem()[1].close()


# ---------------------------------------------------------------- loading


def resolve_stack(name: str, folders: list[tuple[Path, str]], source) -> str:
    """Absolute path of stack `name`: as given if absolute, else in the first of `folders` ((folder, label))
    holding it."""
    for suffix in (":mrcs", ":mrc"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if os.path.isabs(name):
        if os.path.isfile(name):
            return name
        raise CryoInputError(f"image stack {name} not found", path=source)
    candidates = [(Path(folder) / name, label) for folder, label in folders]
    for cand, _ in candidates:
        if cand.is_file():
            return os.path.abspath(cand)
    tried = [f"{cand} ({label})" for cand, label in candidates]
    raise CryoInputError(
        f"image stack {name} not found as {', '.join(tried[:-1])} nor {tried[-1]}; run from "
        "the project directory the paths are relative to",
        path=source,
    )


def project_relative(path) -> str:
    """`path` relative to the current directory (RELION's project directory) if it lies inside it, else absolute."""
    path, project = Path(os.path.abspath(path)), Path(os.getcwd())
    return str(path.relative_to(project)) if path.is_relative_to(project) else str(path)


def read_images(table: ParticleTable, indices, out: np.ndarray | None = None) -> np.ndarray:
    """float32 images (len(indices), box, box) of the particles at `indices` (0-based table rows), which share one
    box size; into ``out`` (C-contiguous float32 of that shape, e.g. a pinned buffer's array) where given."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    boxes = np.unique(table.boxes[indices]) if len(indices) else [table.reference_optics.box]
    if len(boxes) != 1:
        raise ValueError(f"images of different boxes {list(boxes)} read as one batch")  # a caller's bug
    box = int(boxes[0])
    out = image_buffer(out, len(indices), box)
    if len(indices) == 0:
        return out
    stacks, inverse = np.unique(table.image_stack[indices].astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    for k, path in enumerate(stacks):
        rows = np.flatnonzero(inverse == k)
        stack = table.stack(path)
        if stack.shape[1] != box:
            raise CryoInputError(
                f"images are {stack.shape[1]} px but rlnImageSize is {box}; fix rlnImageSize or re-extract", path=path
            )
        if len(stacks) == 1:  # all of them, in order: straight into the result
            images = stack.read(table.image_index[indices], out=out)
        else:
            images = stack.read(table.image_index[indices[rows]])
            out[rows] = images
        if not all_finite(images):
            raise CryoInputError("the stack contains NaN or Inf pixels; re-extract the particles", path=path)
    return out
