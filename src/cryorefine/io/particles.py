"""The particle table (STAR 3.0 / 3.1, and cryoSPARC .cs through io.cryosparc) as structure-of-arrays, plus image
reads."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cryorefine.errors import CryoInputError
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
from cryorefine.io.cryosparc import load_cs_particles
from cryorefine.io.mrc import open_stack
from cryorefine.io.star import read_star, write_star

_PIXEL_COLUMNS = ("rlnImagePixelSize", "rlnDetectorPixelSize", "rlnMagnification")
_OPTICS_VALUE_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_OPTICS_OWN_COLUMNS = (
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnImageSize",
    "rlnImageDimensionality",
    *_PIXEL_COLUMNS,
    *_OPTICS_VALUE_COLUMNS,
)
# particle columns turned into table fields (everything else goes to `extra`)
_PARTICLE_OWN_COLUMNS = (
    "rlnImageName",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnOriginX",
    "rlnOriginY",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnOpticsGroup",
    "rlnRandomSubset",
    "rlnClassNumber",
)


def _require(df: pd.DataFrame, columns, block: str, path) -> None:
    for col in columns:
        if col not in df.columns:
            raise CryoInputError(f"missing column {col} in data_{block}; add it or re-export the particles", path=path)


_EXACT = 2.0**53  # whole numbers from here on are not exact in float64 (starfile may read a column as floats)


def numeric_column(df: pd.DataFrame, name: str, block: str, path, default=0.0, whole: bool = False) -> np.ndarray:
    """Column ``name`` of data_``block`` as float64 (int64 if ``whole``), ``default`` in every row if it is absent.
    Every value must be a finite number (a whole one if ``whole``): text, an empty or NaN field (also what a row with
    too few values leaves) and Inf stop with the row and the value."""
    if name not in df.columns:
        return np.full(len(df), default, np.int64 if whole else np.float64)
    raw = df[name]
    if whole and raw.dtype.kind == "i":  # exact, whatever the size
        return raw.to_numpy(np.int64, copy=True)
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, copy=True)  # text -> NaN
    if raw.dtype.kind in "bO":  # pandas reads true/false as booleans, which are not numbers in a STAR file
        values[raw.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(bool)] = np.nan
    bad = ~np.isfinite(values)
    if whole:
        bad |= (values != np.round(values)) | (np.abs(values) >= _EXACT)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = raw.iloc[i]
        if isinstance(value, float) and np.isnan(value):
            shown = "NaN or missing (a row with too few values?)"
        else:
            shown = repr(value) if isinstance(value, str) else str(value)
        what = "a whole number (below 2^53)" if whole else "a finite number"
        raise CryoInputError(
            f"{name} in data_{block} row {i + 1} is {shown}, not {what}; fix the value or re-export the particles",
            path=path,
        )
    return values.astype(np.int64) if whole else values


def _check_values(values: np.ndarray, ok: np.ndarray, name: str, block: str, path, rule: str) -> None:
    """Stop at the first row where ``ok`` is False: ``name`` in that row breaks ``rule`` (e.g. 'must be > 0')."""
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise CryoInputError(
            f"{name} in data_{block} row {i + 1} is {values[i]:g}; it {rule}; fix the value or re-export the particles",
            path=path,
        )


def _pixel_size_angst(df: pd.DataFrame, block: str, path) -> np.ndarray:
    if "rlnImagePixelSize" in df.columns:
        name, angpix = "rlnImagePixelSize", numeric_column(df, "rlnImagePixelSize", block, path)
    elif "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        detector = numeric_column(df, "rlnDetectorPixelSize", block, path)
        magnification = numeric_column(df, "rlnMagnification", block, path)
        _check_values(magnification, magnification > 0, "rlnMagnification", block, path, "must be > 0")
        name, angpix = "rlnDetectorPixelSize", detector * 1e4 / magnification
    else:
        raise CryoInputError(
            f"missing column rlnImagePixelSize (or rlnDetectorPixelSize and "
            f"rlnMagnification) in data_{block}; add the pixel size",
            path=path,
        )
    _check_values(angpix, plausible_angpix(angpix), name, block, path, ANGPIX_RULE)
    return angpix


def _optics_values(df: pd.DataFrame, block: str, path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voltage kV, Cs mm, amplitude contrast) of every row, each checked: the CTF needs them in range."""
    _require(df, _OPTICS_VALUE_COLUMNS, block, path)
    voltage, cs, q0 = (numeric_column(df, c, block, path) for c in _OPTICS_VALUE_COLUMNS)
    _check_values(voltage, plausible_voltage(voltage), "rlnVoltage", block, path, VOLTAGE_RULE)
    _check_values(cs, plausible_cs(cs), "rlnSphericalAberration", block, path, CS_RULE)
    _check_values(q0, plausible_amplitude_contrast(q0), "rlnAmplitudeContrast", block, path, AMPLITUDE_CONTRAST_RULE)
    return voltage, cs, q0


def _parse_image_names(names: np.ndarray, path) -> tuple[np.ndarray, np.ndarray]:
    """'000123@stack.mrcs' -> (122, 'stack.mrcs'); a name without '@' is a single image (index 0)."""
    parts = pd.Series(names, dtype=object).str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    stacks = np.where(has_at, parts[2].to_numpy(object), parts[0].to_numpy(object)).astype(object)
    index_text = parts[0].where(has_at, "1")
    index_1 = pd.to_numeric(index_text, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(index_1) | (index_1 < 1) | (index_1 != np.round(index_1)) | (index_1 >= _EXACT)
    if bad.any():
        raise CryoInputError(
            f"bad rlnImageName {names[np.flatnonzero(bad)[0]]!r}; expected 'index@stack.mrcs' with a 1-based index",
            path=path,
        )
    return index_1.astype(np.int64) - 1, stacks


def particles_block(blocks: dict, path) -> tuple[str, pd.DataFrame]:
    if "particles" in blocks:
        return "particles", blocks["particles"]
    for name, df in blocks.items():
        if name != "optics" and "rlnImageName" in df.columns:
            return name, df
    name = next((n for n in blocks if n != "optics"), None)
    if name is None:
        raise CryoInputError("no particles block (data_particles) found", path=path)
    return name, blocks[name]


MAX_BEAM_TILT_MRAD = 50.0  # CtfRefine finds a few mrad; more is a mislabelled column (radians, µrad)
MAG_DETERMINANT = (0.5, 2.0)  # a magnification matrix's determinant: ~1 ± a few %; outside, singular or mislabelled
_MAG_COLUMNS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
# optics columns that change the physics: read here, refused as per-particle (STAR 3.0) columns
ABERRATION_COLUMNS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike", *_MAG_COLUMNS,
                       "rlnCtfDataAreCtfPremultiplied", "rlnCtfDataArePhaseFlipped")  # fmt: skip


def _zernike_lists(df: pd.DataFrame, name: str, block: str, path) -> list[tuple[float, ...]]:
    """RELION's vector column (``[c0,c1,...]`` per row) as tuples of finite floats; () where absent."""
    if name not in df.columns:
        return [()] * len(df)
    out = []
    for i, raw in enumerate(df[name].tolist()):
        text = str(raw).strip()
        try:
            if not (text.startswith("[") and text.endswith("]")):
                raise ValueError
            values = tuple(float(v) for v in text[1:-1].split(",") if v.strip())
            if not all(np.isfinite(values)):
                raise ValueError
        except ValueError:
            raise CryoInputError(
                f"{name} in data_{block} row {i + 1} is {text!r}; it must be RELION's list of finite numbers "
                "[c0,c1,...]; fix the value or re-run CtfRefine",
                path=path,
            ) from None
        out.append(values)
    return out


def _aberrations(df: pd.DataFrame, path) -> list[dict]:
    """Each optics row's beam tilt, odd and even aberrations, magnification matrix and premultiplied flag (the
    OpticsGroup fields), checked: a value outside what a microscope gives stops with the row and the fix."""
    n = len(df)
    tilt = [numeric_column(df, c, "optics", path) for c in ("rlnBeamTiltX", "rlnBeamTiltY")]
    for name, values in zip(("rlnBeamTiltX", "rlnBeamTiltY"), tilt):
        rule = f"must be the beam tilt in mrad (at most {MAX_BEAM_TILT_MRAD:g} either way)"
        _check_values(values, np.abs(values) <= MAX_BEAM_TILT_MRAD, name, "optics", path, rule)
    present = [c in df.columns for c in _MAG_COLUMNS]
    if any(present) and not all(present):
        missing = [c for c, p in zip(_MAG_COLUMNS, present) if not p]
        raise CryoInputError(f"data_optics has some magnification columns but not {', '.join(missing)}", path=path)
    mag = np.stack([numeric_column(df, c, "optics", path, default=float(c[-2] == c[-1])) for c in _MAG_COLUMNS], 1)
    det = mag[:, 0] * mag[:, 3] - mag[:, 1] * mag[:, 2]
    lo, hi = MAG_DETERMINANT
    rule = f"is the determinant of the magnification matrix; it must lie in {lo:g}..{hi:g} (a singular matrix, or " \
        "not RELION's MagMat)"  # fmt: skip
    _check_values(det, (det >= lo) & (det <= hi), "rlnMagMat00*11 - 01*10", "optics", path, rule)
    flags = {c: numeric_column(df, c, "optics", path, whole=True)
             for c in ("rlnCtfDataAreCtfPremultiplied", "rlnCtfDataArePhaseFlipped")}  # fmt: skip
    for name, values in flags.items():
        _check_values(values, np.isin(values, (0, 1)), name, "optics", path, "must be 0 or 1")
    odd = _zernike_lists(df, "rlnOddZernike", "optics", path)
    even = _zernike_lists(df, "rlnEvenZernike", "optics", path)
    return [
        {
            "beam_tilt_mrad": (float(tilt[0][i]), float(tilt[1][i])),
            "odd_zernike": odd[i],
            "even_zernike": even[i],
            "mag": tuple(float(v) for v in mag[i]),
            "ctf_premultiplied": bool(flags["rlnCtfDataAreCtfPremultiplied"][i]),
            "phase_flipped": bool(flags["rlnCtfDataArePhaseFlipped"][i]),
        }
        for i in range(n)
    ]


def _optics_31(optics_df: pd.DataFrame, path) -> list[OpticsGroup]:
    _require(optics_df, ("rlnOpticsGroup",), "optics", path)
    if len(optics_df) == 0:
        raise CryoInputError("data_optics has no rows; add a row for each optics group", path=path)
    angpix = _pixel_size_angst(optics_df, "optics", path)
    voltage, cs, q0 = _optics_values(optics_df, "optics", path)
    numbers = numeric_column(optics_df, "rlnOpticsGroup", "optics", path, whole=True)
    if len(set(numbers.tolist())) != len(numbers):
        raise CryoInputError("duplicate rlnOpticsGroup numbers in data_optics", path=path)
    boxes = numeric_column(optics_df, "rlnImageSize", "optics", path, default=0, whole=True)  # 0: from the stacks
    if "rlnImageSize" in optics_df.columns:
        _check_values(boxes, boxes > 0, "rlnImageSize", "optics", path, "must be the image size in pixels (> 0)")
    extra_cols = [c for c in optics_df.columns if c not in _OPTICS_OWN_COLUMNS]
    aberrations = _aberrations(optics_df, path)
    groups = []
    for i, row in enumerate(optics_df.to_dict("records")):
        number = int(numbers[i])
        groups.append(
            OpticsGroup(
                number=number,
                name=str(row.get("rlnOpticsGroupName", f"opticsGroup{number}")),
                angpix=float(angpix[i]),
                box=int(boxes[i]),
                voltage_kv=float(voltage[i]),
                cs_mm=float(cs[i]),
                amplitude_contrast=float(q0[i]),
                extra={c: row[c] for c in extra_cols},
                **aberrations[i],
            )
        )
    return groups


def _optics_30(df: pd.DataFrame, path) -> tuple[list[OpticsGroup], np.ndarray, np.ndarray]:
    """Optics groups from the unique (voltage, Cs, Q0, pixel size) rows of a STAR 3.0 table."""
    angpix = _pixel_size_angst(df, "", path)
    keys = pd.DataFrame(dict(zip(_OPTICS_VALUE_COLUMNS, _optics_values(df, "", path))))
    keys["angpix"] = angpix
    codes, uniques = pd.MultiIndex.from_frame(keys).factorize()
    groups = [
        OpticsGroup(
            number=k + 1,
            name=f"opticsGroup{k + 1}",
            angpix=float(u[3]),
            box=0,
            voltage_kv=float(u[0]),
            cs_mm=float(u[1]),
            amplitude_contrast=float(u[2]),
        )
        for k, u in enumerate(uniques)
    ]
    return groups, codes.astype(np.int64), angpix


def particle_pixel_sizes(blocks: dict, block: str, df: pd.DataFrame, path) -> np.ndarray:
    """Å/px of every particle of ``df`` (the particles block ``block`` of ``blocks``): its optics group's (STAR 3.1) or
    its own columns' (3.0)."""
    if "optics" not in blocks:
        return _pixel_size_angst(df, block, path)
    groups = _optics_31(blocks["optics"], path)
    group = _group_of_particles(df, block, groups, path)
    return np.array([g.angpix for g in groups], np.float64)[group]


def _group_of_particles(df: pd.DataFrame, block: str, groups: list[OpticsGroup], path) -> np.ndarray:
    """The index into ``groups`` of every particle, by rlnOpticsGroup (optional where there is one group)."""
    if "rlnOpticsGroup" in df.columns:
        numbers = numeric_column(df, "rlnOpticsGroup", block, path, whole=True)
    elif len(groups) == 1:
        numbers = np.full(len(df), groups[0].number, np.int64)
    else:
        raise CryoInputError(f"missing column rlnOpticsGroup in data_{block}", path=path)
    group = pd.Index([g.number for g in groups]).get_indexer(numbers)
    if (group < 0).any():
        unknown = sorted(set(numbers[group < 0].tolist()))
        raise CryoInputError(f"particles refer to optics group(s) {unknown} absent from data_optics", path=path)
    return group.astype(np.int64)


def origins_angst(
    df: pd.DataFrame, pixel_sizes: Callable[[], np.ndarray], block: str = "particles", path=None
) -> tuple[np.ndarray, np.ndarray]:
    """Origin offsets (x, y) in Å of every particle: rlnOriginX/YAngst (STAR 3.1), else rlnOriginX/Y in pixels (3.0)
    times ``pixel_sizes()`` (asked only then), else zero. ``block`` and ``path`` name the table in messages."""
    if "rlnOriginXAngst" in df.columns or "rlnOriginYAngst" in df.columns:
        x, y = (numeric_column(df, f"rlnOrigin{a}Angst", block, path) for a in "XY")
    elif "rlnOriginX" in df.columns or "rlnOriginY" in df.columns:
        angpix = pixel_sizes()
        x, y = (numeric_column(df, f"rlnOrigin{a}", block, path) * angpix for a in "XY")
    else:
        return np.zeros(len(df)), np.zeros(len(df))
    unit = "Angst" if "rlnOriginXAngst" in df.columns or "rlnOriginYAngst" in df.columns else ""
    for axis, values in zip("XY", (x, y)):
        _check_values(values, plausible_origin(values), f"rlnOrigin{axis}{unit}", block, path, ORIGIN_RULE)
    return x, y


ANGLE_PRIOR_COLUMNS = ("rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior")
NO_ANGLE_PRIOR = 999.0  # RELION's value for "no prior on this angle" (it compares within ±0.01)
MAX_PRIOR_ANGLE = 360.0
ANGLE_PRIOR_RULE = f"must be an angle in degrees (at most {MAX_PRIOR_ANGLE:g} either way) or RELION's 999 for none"


def _unset(angle_deg: np.ndarray) -> np.ndarray:
    return np.abs(angle_deg - NO_ANGLE_PRIOR) < 0.01


def checked_priors(extra: pd.DataFrame, angpix: np.ndarray, block: str, path) -> pd.DataFrame:
    """``extra`` (the particles' other columns) with the orientation priors checked and as numbers: rlnAngleRot/Tilt/
    PsiPrior (degrees, or RELION's 999 for none) and rlnOriginX/YPriorAngst (Å); STAR 3.0's rlnOriginX/YPrior (pixels)
    become them with ``angpix`` (each particle's Å/px), as RELION's converter does. They are written back unchanged."""
    out = extra.copy()
    for name in ANGLE_PRIOR_COLUMNS:
        if name in out.columns:
            v = numeric_column(out, name, block, path)
            _check_values(v, (np.abs(v) <= MAX_PRIOR_ANGLE) | _unset(v), name, block, path, ANGLE_PRIOR_RULE)
            out[name] = v
    for axis in "XY":
        angst, pixels = f"rlnOrigin{axis}PriorAngst", f"rlnOrigin{axis}Prior"
        if angst in out.columns:
            name, v = angst, numeric_column(out, angst, block, path)
        elif pixels in out.columns:
            name, v = pixels, numeric_column(out, pixels, block, path) * angpix
        else:
            continue
        _check_values(v, plausible_origin(v), name, block, path, ORIGIN_RULE)
        out = out.drop(columns=[pixels], errors="ignore")
        out[angst] = v
    return out


def angle_priors(
    table: ParticleTable, rows: np.ndarray, rot_deg: np.ndarray, tilt_deg: np.ndarray, psi_deg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The centres (rot, tilt, psi), degrees (len(rows),), of the local angular searches of the particles ``rows``:
    each angle's rlnAngle*Prior where the file gives one (not 999), else the particle's current angle (``rot_deg``,
    ``tilt_deg``, ``psi_deg``), as RELION."""
    out = []
    for name, current in zip(ANGLE_PRIOR_COLUMNS, (rot_deg, tilt_deg, psi_deg)):
        if name not in table.extra.columns:
            out.append(np.asarray(current, np.float64))
            continue
        prior = table.extra[name].to_numpy(np.float64)[rows]
        out.append(np.where(_unset(prior), current, prior))
    return out[0], out[1], out[2]


def offset_priors_angst(table: ParticleTable, rows: np.ndarray) -> np.ndarray | None:
    """(len(rows), 2) the centres (x, y) of the particles' offset prior, Å: rlnOriginX/YPriorAngst (0 for an axis
    without); None when the file has neither (RELION centres the prior on 0)."""
    names = [f"rlnOrigin{axis}PriorAngst" for axis in "XY"]
    if not any(name in table.extra.columns for name in names):
        return None
    return np.stack(
        [
            table.extra[name].to_numpy(np.float64)[rows] if name in table.extra.columns else np.zeros(len(rows))
            for name in names
        ],
        -1,
    )


def load_particles(star_path, project_dir=None) -> ParticleTable:
    """Load a RELION 3.0/3.1+ STAR file (stacks resolved as RELION does) or a cryoSPARC .cs file."""
    star_path = Path(star_path)
    if star_path.suffix == ".cs":
        return load_cs_particles(star_path, project_dir)
    blocks = read_star(star_path)
    block, df = particles_block(blocks, star_path)
    _require(df, ("rlnImageName",), block, star_path)
    if len(df) == 0:
        raise CryoInputError(f"no particles in data_{block}", path=star_path)
    df = df.reset_index(drop=True)
    per_particle = [c for c in ABERRATION_COLUMNS if c in df.columns]
    if per_particle:
        raise CryoInputError(
            f"{per_particle[0]} in data_{block} is per particle (RELION 3.0); RELION 3.1 keeps it per optics group: "
            "convert the file with relion_convert_star",
            path=star_path,
        )

    if "optics" in blocks:  # STAR 3.1
        optics = _optics_31(blocks["optics"], star_path)
        optics_group = _group_of_particles(df, block, optics, star_path)
        particle_angpix = np.array([g.angpix for g in optics])[optics_group]
        own = set(_PARTICLE_OWN_COLUMNS)
    else:  # STAR 3.0 (one block, per-particle optics)
        optics, optics_group, particle_angpix = _optics_30(df, star_path)
        own = set(_PARTICLE_OWN_COLUMNS) | set(_OPTICS_OWN_COLUMNS)

    # image names and stack paths (each unique stack resolved once)
    image_name = df["rlnImageName"].astype(str).to_numpy(object)
    image_index, stack_names = _parse_image_names(image_name, star_path)
    unique_names, inverse = np.unique(stack_names.astype(str), return_inverse=True)
    folders = [
        (Path(project_dir) if project_dir is not None else Path.cwd(), "project directory"),
        (star_path.resolve().parent, "STAR file folder"),
    ]
    resolved = np.array([resolve_stack(n, folders, star_path) for n in unique_names], object)
    image_stack = resolved[inverse.reshape(-1)]

    # boxes missing from the file: read them from each group's first stack header
    for i, group in enumerate(optics):
        if group.box <= 0:
            members = np.flatnonzero(optics_group == i)
            if len(members):
                with open_stack(image_stack[members[0]]) as stack:
                    group.box = stack.shape[-1]

    origin_x, origin_y = origins_angst(df, lambda: particle_angpix, block, star_path)

    number = lambda name, default=0.0, whole=False: numeric_column(df, name, block, star_path, default, whole)  # noqa: E731
    has_ctf = "rlnDefocusU" in df.columns
    defocus_u = number("rlnDefocusU")
    defocus_v = number("rlnDefocusV") if "rlnDefocusV" in df.columns else defocus_u.copy()

    return ParticleTable(
        image_index=image_index,
        image_stack=image_stack,
        image_name=image_name,
        rot_deg=number("rlnAngleRot"),
        tilt_deg=number("rlnAngleTilt"),
        psi_deg=number("rlnAnglePsi"),
        origin_x_angst=origin_x,
        origin_y_angst=origin_y,
        defocus_u_angst=defocus_u,
        defocus_v_angst=defocus_v,
        defocus_angle_deg=number("rlnDefocusAngle"),
        phase_shift_deg=number("rlnPhaseShift"),
        ctf_bfactor=number("rlnCtfBfactor"),
        ctf_scale=number("rlnCtfScalefactor", 1.0),
        optics_group=optics_group,
        random_subset=number("rlnRandomSubset", 0, whole=True),
        class_number=number("rlnClassNumber", 1, whole=True),
        optics=optics,
        extra=checked_priors(df[[c for c in df.columns if c not in own]], particle_angpix, block, star_path),
        has_ctf=has_ctf,
        star_path=str(star_path),
        has_angles=all(c in df.columns for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")),
    )


# ---------------------------------------------------------------- writing


def image_names_from_here(table: ParticleTable) -> np.ndarray:
    """rlnImageName with each stack relative to the directory the command runs in (RELION's project directory, where
    its programs look), whichever folder the input's names were found in; names that already are so are kept.
    Made once per table and directory (pandas string work that held the interpreter lock in the writer thread at
    every iteration)."""
    here = os.getcwd()
    if here not in table.names_from:
        table.names_from[here] = _names_from_here(table)
    return table.names_from[here]


def _names_from_here(table: ParticleTable) -> np.ndarray:
    stacks, inverse = np.unique(table.image_stack.astype(str), return_inverse=True)
    here = pd.Series([project_relative(s) for s in stacks], dtype=object)[inverse.reshape(-1)].to_numpy(object)
    parts = pd.Series(table.image_name, dtype=object).astype(str).str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    given = parts[2].where(has_at, parts[0]).str.replace(r":mrcs?$", "", regex=True).to_numpy(object)
    moved = np.flatnonzero(given != here)
    if len(moved) == 0:
        return table.image_name
    names = table.image_name.copy()
    names[moved] = [f"{table.image_index[i] + 1:06d}@{here[i]}" if has_at[i] else here[i] for i in moved]
    return names


def particle_blocks(table: ParticleTable, **updated_columns) -> dict[str, pd.DataFrame]:
    """RELION 3.1 blocks {'optics', 'particles'}; `updated_columns` (name -> array) override/add."""
    optics_rows = []
    for g in table.optics:
        row = {
            "rlnOpticsGroupName": g.name,
            "rlnOpticsGroup": int(g.number),
            "rlnImagePixelSize": float(g.angpix),
            "rlnImageSize": int(g.box),
            "rlnImageDimensionality": 2,
            "rlnVoltage": float(g.voltage_kv),
            "rlnSphericalAberration": float(g.cs_mm),
            "rlnAmplitudeContrast": float(g.amplitude_contrast),
        }
        row.update({k: v for k, v in g.extra.items() if k not in row})
        optics_rows.append(row)
    cols = {
        "rlnImageName": image_names_from_here(table),
        "rlnAngleRot": table.rot_deg,
        "rlnAngleTilt": table.tilt_deg,
        "rlnAnglePsi": table.psi_deg,
        "rlnOriginXAngst": table.origin_x_angst,
        "rlnOriginYAngst": table.origin_y_angst,
    }
    if table.has_ctf:
        cols.update(
            {
                "rlnDefocusU": table.defocus_u_angst,
                "rlnDefocusV": table.defocus_v_angst,
                "rlnDefocusAngle": table.defocus_angle_deg,
                "rlnPhaseShift": table.phase_shift_deg,
                "rlnCtfBfactor": table.ctf_bfactor,
                "rlnCtfScalefactor": table.ctf_scale,
            }
        )
    numbers = np.array([g.number for g in table.optics], np.int64)
    cols["rlnOpticsGroup"] = numbers[table.optics_group]
    if (table.random_subset != 0).any():
        cols["rlnRandomSubset"] = table.random_subset
    cols["rlnClassNumber"] = table.class_number
    particles = pd.DataFrame(cols)
    extra = table.extra.reset_index(drop=True)
    for name in extra.columns:
        if name not in particles.columns:
            particles[name] = extra[name].to_numpy()
    for name, values in updated_columns.items():
        values = np.asarray(values)
        if values.shape != (len(table),):
            raise ValueError(f"column {name}: shape {values.shape} != ({len(table)},)")
        particles[name] = values
    return {"optics": pd.DataFrame(optics_rows), "particles": particles}


def write_particles(path, table: ParticleTable, **updated_columns) -> None:
    """Write the table as a RELION 3.1 particle STAR file (atomically; to ``path``, or each of a list of paths)."""
    write_star(path, particle_blocks(table, **updated_columns))
