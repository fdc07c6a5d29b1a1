"""cryoSPARC particle files (.cs) as a ParticleTable, with pyem's csparc2star conventions.

A .cs file is a numpy structured array, one row per particle. Fields read (others are ignored, blob/sign too, as
pyem does):
  blob/path    stack file, relative to the cryoSPARC project folder (a leading '>' is dropped)
  blob/idx     0-based image index in the stack
  blob/shape   (ny, nx) image size in pixels;  blob/psize_A  pixel size (Å)
  ctf/accel_kv (kV), ctf/cs_mm (mm), ctf/amp_contrast: required
  ctf/df1_A, ctf/df2_A (Å), ctf/df_angle_rad, ctf/phase_shift_rad (radians), ctf/bfactor (Å²)
  ctf/exp_group_id                 exposure group -> optics group
  alignments3D/pose                axis-angle rotation vector (radians)
  alignments3D/shift               (x, y) in pixels of alignments3D/psize_A (Å)
  alignments3D/split               0/1 -> rlnRandomSubset 1/2

Conventions (pyem's csparc2star, which RELION users rely on): RELION's rotation matrix A (Euler_angles2matrix)
is the transpose of the pose's rotation, A = R(pose)ᵀ; the shift is RELION's origin offset with the same sign,
rlnOriginXAngst = shift_x · alignments3D/psize_A; defocus 1/2 are DefocusU/V; angles go from radians to degrees.
"""

from __future__ import annotations

import pickle
import tokenize
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryorefine.errors import CryoInputError
from cryorefine.geometry.axis_angle import axis_angle_to_matrix
from cryorefine.geometry.euler import matrix_to_euler
from cryorefine.io.table import (
    AMPLITUDE_CONTRAST_RULE,
    ANGPIX_RULE,
    CS_RULE,
    ORIGIN_RULE,
    VOLTAGE_RULE,
    OpticsGroup,
    ParticleTable,
    plausible_amplitude_contrast,
    plausible_angpix,
    plausible_cs,
    plausible_origin,
    plausible_voltage,
    project_relative,
    resolve_stack,
)

REQUIRED_FIELDS = (
    "blob/path",
    "blob/idx",
    "blob/shape",
    "blob/psize_A",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
)
_TEXT, _WHOLE, _NUMBER = "SUO", "iu", "iuf"  # numpy dtype kinds
FIELD_TYPES = {  # every field read: (dtype kinds, shape of one row's value, what it must be)
    "blob/path": (_TEXT, (), "a path"),
    "blob/idx": (_WHOLE, (), "a 0-based image index"),
    "blob/shape": (_WHOLE, (2,), "the image size (ny, nx) in pixels"),
    "blob/psize_A": (_NUMBER, (), "a pixel size"),
    "ctf/accel_kv": (_NUMBER, (), "a voltage"),
    "ctf/cs_mm": (_NUMBER, (), "a spherical aberration"),
    "ctf/amp_contrast": (_NUMBER, (), "an amplitude contrast"),
    "ctf/df1_A": (_NUMBER, (), "a defocus"),
    "ctf/df2_A": (_NUMBER, (), "a defocus"),
    "ctf/df_angle_rad": (_NUMBER, (), "an angle"),
    "ctf/phase_shift_rad": (_NUMBER, (), "an angle"),
    "ctf/bfactor": (_NUMBER, (), "a B-factor"),
    "ctf/exp_group_id": (_WHOLE, (), "an exposure group number"),
    "alignments3D/pose": (_NUMBER, (3,), "an axis-angle rotation (3 numbers)"),
    "alignments3D/shift": (_NUMBER, (2,), "a shift (x, y)"),
    "alignments3D/psize_A": (_NUMBER, (), "a pixel size"),
    "alignments3D/split": (_WHOLE, (), "a half-set number"),
}
FIELD_RANGES = {  # field: (accepted, the rule quoted in the message)
    "blob/idx": (lambda v: (v >= 0) & (v < 2**62), "must be a 0-based image index (0 to 2^62)"),
    "blob/shape": (lambda v: v > 0, "must be the image size in pixels (> 0)"),
    "blob/psize_A": (plausible_angpix, ANGPIX_RULE),
    "ctf/accel_kv": (plausible_voltage, VOLTAGE_RULE),
    "ctf/cs_mm": (plausible_cs, CS_RULE),
    "ctf/amp_contrast": (plausible_amplitude_contrast, AMPLITUDE_CONTRAST_RULE),
}
NUMPY_MAGIC = b"\x93NUMPY"
FOLDERS_ABOVE = 3  # a .cs lies in a job folder (P1/J12) or an export (P1/exports/groups/NAME) of the project folder


def read_cs(path) -> np.ndarray:
    """The structured array of a particle .cs file, checked for the fields we need and for finite numbers."""
    path = Path(path)
    if not path.is_file():
        raise CryoInputError("file not found; check the path", path=path)
    try:
        cs = _load_numpy(path)
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # what numpy's .npy reader raises for a damaged header (its dictionary is parsed as Python) or payload
        raise CryoInputError(
            f"not a cryoSPARC .cs file ({type(exc).__name__}: {str(exc)[:200]}); give the particles .cs "
            "of a cryoSPARC job or export",
            path=path,
        ) from exc
    if cs.dtype.names is None or cs.ndim != 1:
        raise CryoInputError(
            "not a cryoSPARC .cs file (no table of named fields); give the particles .cs of a cryoSPARC job or export",
            path=path,
        )
    missing = [f for f in REQUIRED_FIELDS if f not in cs.dtype.names]
    if missing:
        raise CryoInputError(
            f"missing field(s) {', '.join(missing)}; give a .cs with particle images and CTF "
            "(an Extract or Refine job's particles, or an Export of them)",
            path=path,
        )
    if len(cs) == 0:
        raise CryoInputError("the .cs file holds no particles", path=path)
    _check_fields(cs, path)
    for name in cs.dtype.names:
        if cs.dtype[name].base.kind == "f" and not np.isfinite(cs[name]).all():
            raise CryoInputError(
                f"field {name} holds NaN or Inf values; re-run or re-export the cryoSPARC job", path=path
            )
    return cs


def _check_fields(cs: np.ndarray, path) -> None:
    """Each field we read of the type and shape FIELD_TYPES says, and in FIELD_RANGES' range (NaN is checked after)."""
    assert cs.dtype.names is not None
    for name, (kinds, shape, what) in FIELD_TYPES.items():
        if name not in cs.dtype.names:
            continue
        dtype = cs.dtype[name]
        if dtype.base.kind not in kinds or dtype.shape != shape:
            raise CryoInputError(
                f"field {name} holds {dtype.base} values of shape {dtype.shape}, not {what}; re-export the particles "
                "from cryoSPARC",
                path=path,
            )
        if name in FIELD_RANGES:
            accepted, rule = FIELD_RANGES[name]
            values = np.asarray(cs[name])
            with np.errstate(invalid="ignore"):  # NaN is refused by read_cs with its own message
                ok = accepted(values) | np.isnan(values.astype(np.float64))
            ok = ok.reshape(len(cs), -1).all(axis=1)
            if not ok.all():
                row = int(np.flatnonzero(~ok)[0])
                raise CryoInputError(
                    f"field {name} of row {row + 1} is {values[row]}; it {rule}; re-run or re-export the cryoSPARC job",
                    path=path,
                )


def _load_numpy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(len(NUMPY_MAGIC)) != NUMPY_MAGIC:
            raise ValueError("no numpy .npy header")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
    # some cryoSPARC versions store path strings as Python objects, which numpy keeps pickled inside the .npy
    return np.load(path, allow_pickle=True)


def pose_to_euler_deg(pose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cryoSPARC poses (n, 3) (axis-angle, radians) -> RELION (rot, tilt, psi) in degrees, A = R(pose)ᵀ."""
    A = np.swapaxes(axis_angle_to_matrix(pose), -1, -2)
    rot, tilt, psi = matrix_to_euler(torch.from_numpy(A))
    return rot.numpy(), tilt.numpy(), psi.numpy()


def _text(values, name: str, path) -> np.ndarray:
    """The strings of a text field (bytes as UTF-8, as cryoSPARC writes them)."""
    out = np.empty(len(values), object)
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError as exc:
                raise CryoInputError(
                    f"field {name} of row {i + 1} is not UTF-8 text ({v[:60]!r}); re-export the particles from "
                    "cryoSPARC",
                    path=path,
                ) from exc
        elif not isinstance(v, str):
            raise CryoInputError(
                f"field {name} of row {i + 1} is a {type(v).__name__}, not text; re-export the particles from "
                "cryoSPARC",
                path=path,
            )
        out[i] = v
    return out


def _field(cs: np.ndarray, name: str, default) -> np.ndarray:
    assert cs.dtype.names is not None  # a structured array (read_cs)
    return np.asarray(cs[name], np.float64) if name in cs.dtype.names else np.full(len(cs), default, np.float64)


def _optics(cs: np.ndarray) -> tuple[list[OpticsGroup], np.ndarray]:
    """One optics group per exposure group (split further where voltage, Cs, Q0, pixel or box size differ)."""
    keys = np.stack(
        [
            _field(cs, "ctf/exp_group_id", 1),
            _field(cs, "ctf/accel_kv", 0),
            _field(cs, "ctf/cs_mm", 0),
            _field(cs, "ctf/amp_contrast", 0),
            _field(cs, "blob/psize_A", 0),
            np.asarray(cs["blob/shape"], np.float64).reshape(len(cs), -1)[:, -1],
        ],
        1,
    )
    uniques, index = np.unique(keys, axis=0, return_inverse=True)
    exp_ids = uniques[:, 0].astype(np.int64)
    groups = []
    for k, (exp_id, kv, cs_mm, q0, angpix, box) in enumerate(uniques):
        name = f"exp_group{int(exp_id)}" + (f"_{k + 1}" if (exp_ids == exp_id).sum() > 1 else "")
        groups.append(
            OpticsGroup(
                number=k + 1,
                name=name,
                angpix=float(angpix),
                box=int(box),
                voltage_kv=float(kv),
                cs_mm=float(cs_mm),
                amplitude_contrast=float(q0),
            )
        )
    return groups, index.reshape(-1).astype(np.int64)


def load_cs_particles(cs_path, project_dir=None) -> ParticleTable:
    """Particles of a cryoSPARC .cs file. Stacks are looked for in `project_dir` (the cryoSPARC project folder;
    default: the current directory), then in the .cs folder and up to three folders above it; image_name holds
    'index@stack' with the stack found, relative to the current directory (RELION's project directory)."""
    cs_path = Path(cs_path)
    cs = read_cs(cs_path)
    assert cs.dtype.names is not None  # read_cs checked it
    n = len(cs)
    cs_dir = cs_path.resolve().parent
    folders = [
        (Path(project_dir) if project_dir is not None else Path.cwd(), "project directory"),
        (cs_dir, ".cs folder"),
        *((d, f"{i + 1} up from the .cs folder") for i, d in enumerate(cs_dir.parents[:FOLDERS_ABOVE])),
    ]
    names, inverse = np.unique(_text(cs["blob/path"], "blob/path", cs_path).astype(str), return_inverse=True)
    stacks = np.array([resolve_stack(name.lstrip(">"), folders, cs_path) for name in names], object)[
        inverse.reshape(-1)
    ]
    index = np.asarray(cs["blob/idx"], np.int64)
    image_name = np.array([f"{i + 1:06d}@{project_relative(s)}" for i, s in zip(index, stacks)], object)

    optics, optics_group = _optics(cs)
    # particles without 3D alignments (e.g. just extracted) get the identity pose and no shift
    rot, tilt, psi = pose_to_euler_deg(
        cs["alignments3D/pose"] if "alignments3D/pose" in cs.dtype.names else np.zeros((n, 3))
    )
    shift_angpix = _field(
        cs, "alignments3D/psize_A" if "alignments3D/psize_A" in cs.dtype.names else "blob/psize_A", 0.0
    )
    shift = (
        np.asarray(cs["alignments3D/shift"], np.float64) if "alignments3D/shift" in cs.dtype.names else np.zeros((n, 2))
    )
    too_far = ~plausible_origin(shift * shift_angpix[:, None]).all(axis=1)
    if too_far.any():
        row = int(np.flatnonzero(too_far)[0])
        raise CryoInputError(
            f"field alignments3D/shift of row {row + 1} is {shift[row]} px of {shift_angpix[row]:g} Å; the offset "
            f"{ORIGIN_RULE}; re-run or re-export the cryoSPARC job",
            path=cs_path,
        )
    split = _field(cs, "alignments3D/split", -1).astype(np.int64)
    random_subset = split + 1 if set(np.unique(split).tolist()) == {0, 1} else np.zeros(n, np.int64)
    df1 = _field(cs, "ctf/df1_A", 0.0)
    df2 = _field(cs, "ctf/df2_A", 0.0) if "ctf/df2_A" in cs.dtype.names else df1.copy()
    return ParticleTable(
        image_index=index,
        image_stack=stacks,
        image_name=image_name,
        rot_deg=rot,
        tilt_deg=tilt,
        psi_deg=psi,
        origin_x_angst=shift[:, 0] * shift_angpix,
        origin_y_angst=shift[:, 1] * shift_angpix,
        defocus_u_angst=df1,
        defocus_v_angst=df2,
        defocus_angle_deg=np.rad2deg(_field(cs, "ctf/df_angle_rad", 0.0)),
        phase_shift_deg=np.rad2deg(_field(cs, "ctf/phase_shift_rad", 0.0)),
        ctf_bfactor=_field(cs, "ctf/bfactor", 0.0),
        ctf_scale=np.ones(n),
        optics_group=optics_group,
        random_subset=random_subset,
        class_number=np.ones(n, np.int64),
        optics=optics,
        extra=pd.DataFrame(index=pd.RangeIndex(n)),
        has_ctf="ctf/df1_A" in cs.dtype.names,
        star_path=str(cs_path),
    )
