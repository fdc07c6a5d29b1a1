"""Checks of a refinement's inputs before any heavy work: each raises CryoInputError (one line, file + fix).

`validate_refine_inputs(args)` takes the argparse namespace of `cryorefine refine` (or `classify`)
and reads only headers, the STAR file and a bounded sample of image pixels. It writes nothing except
one temporary file in the output folder (removed at once); a folder it had to create for the check
is removed again when a later check fails.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

from cryorefine.errors import CryoInputError
from cryorefine.geometry.symmetry import parse_symmetry
from cryorefine.io.mrc import all_finite, read_map
from cryorefine.io.particles import load_particles
from cryorefine.io.table import ParticleTable, read_images

PIXEL_SIZE_TOLERANCE = 0.01  # relative STAR vs reference header
DISK_RESERVE_BYTES = 100 * 1024**2  # free space needed besides the maps
MAPS_PER_ITERATION = 2  # the half maps (unfiltered ones only at the end)
ITERATIONS_OF_MAPS = 10  # iterations of maps we want room for
FINITE_CHECK_BYTES = 128 * 1024**2  # pixels read for the NaN/Inf check (all of a small set)
ITERATION_FILE = re.compile(r"(.+)_it(\d{3,})_optimiser\.star")  # an iteration's optimiser.star: (root, iteration)


def required_free_bytes(box: int) -> int:
    """Free space wanted in the output folder: 100 MB + 2 maps of box³ float32 × 10 iterations."""
    return DISK_RESERVE_BYTES + MAPS_PER_ITERATION * int(box) ** 3 * 4 * ITERATIONS_OF_MAPS


def check_diameter_sign(diameter: float) -> None:
    if not diameter > 0:
        raise CryoInputError(
            f"--particle_diameter must be positive (got {diameter:g} Å); give the "
            "particle's longest dimension in Å, e.g. --particle_diameter 160"
        )


def check_symmetry(sym: str) -> None:
    parse_symmetry(sym)


def check_one_pixel_size(table: ParticleTable) -> float:
    """The particles' pixel size (Å); optics groups of different pixel sizes are refused (one run, one pixel size)."""
    angpix = np.unique(np.round(np.asarray(table.angpix, dtype=np.float64), 4))
    if len(angpix) > 1:
        raise CryoInputError(
            f"optics groups have different pixel sizes ({', '.join(map(str, angpix))} "
            "Å); refine them separately or re-extract at one pixel size",
            path=table.star_path,
        )
    return float(angpix[0])


def data_phase_flipped(table: ParticleTable) -> bool:
    """Whether data_optics says the images were phase-flipped (rlnCtfDataArePhaseFlipped 1, as relion_preprocess
    writes): RELION's --ctf_phase_flipped for the whole run, so every group must say the same."""
    flags = {o.phase_flipped for o in table.optics}
    if len(flags) > 1:
        raise CryoInputError(
            "some optics groups have rlnCtfDataArePhaseFlipped 1 and others 0; refine them separately",
            path=table.star_path,
        )
    return flags == {True}


NORMALISATION_SAMPLE = 200  # images read for the check (spread over the set): a systematic problem shows in any few


def normalisation_warning(table: ParticleTable, diameter_angst: float) -> str | None:
    """RELION's check that the images were normalised (calculateSumOfPowerSpectraAndAverageImage): outside a circle of
    the particle's radius, the background's mean within ±0.5 of its standard deviation and that deviation within
    0.5..2. Returns the first failing image's figures with RELION's advice, or None. Reads NORMALISATION_SAMPLE images
    spread over the set (RELION reads them all, and stops warning at the first), each optics group's under the
    circle of the particle's ``diameter_angst`` in its own pixels."""
    sample = np.unique(np.linspace(0, len(table) - 1, min(NORMALISATION_SAMPLE, len(table))).round().astype(np.int64))
    for g, optics in enumerate(table.optics):
        rows = sample[table.optics_group[sample] == g]
        radius_px = round(diameter_angst / (2 * optics.angpix))
        y, x = np.mgrid[: optics.box, : optics.box] - optics.box // 2
        outside = (x * x + y * y) > radius_px**2
        if len(rows) == 0 or not outside.any():
            continue
        images = read_images(table, rows)[:, outside].astype(np.float64)
        mean, sd = images.mean(1), images.std(1)
        bad = (np.abs(mean) > 0.5 * sd) | (sd < 0.5) | (sd > 2.0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            return _unnormalised(str(table.image_name[rows[i]]), radius_px, mean[i], sd[i])
    return None


def _unnormalised(image: str, radius_px: int, mean: float, sd: float) -> str:
    """The normalisation warning for one image's background figures, with RELION's advice."""
    return (
        f"image {image} has a background (outside {radius_px} px) of mean {mean:.3g} and "
        f"standard deviation {sd:.3g}, not about 0 and 1: the images seem not normalised; normalise them "
        "(relion_preprocess --norm, or RELION's Extract job with 'Normalize particles'), else the noise model and "
        "the priors are off"
    )


def _stack_box(table: ParticleTable, rows: np.ndarray, path: str, star) -> int:
    """The box (rlnImageSize) of the particles ``rows`` of one stack: their optics groups must agree on it."""
    boxes = np.unique(table.boxes[rows])
    if len(boxes) > 1:
        raise CryoInputError(
            f"{star} puts images of this stack in optics groups of different boxes ({', '.join(map(str, boxes))} px); "
            "give each stack's particles one optics group box (rlnImageSize)",
            path=path,
        )
    return int(boxes[0])


def check_diameters_fit(diameter: float, table: ParticleTable) -> None:
    """The particle diameter fits in every optics group's box."""
    for optics in table.optics:
        check_diameter_fits(diameter, optics.box, optics.angpix)


def check_particles(star, project_dir=None) -> ParticleTable:
    """Load the STAR or .cs file (missing/empty/malformed, columns, stacks) and check every stack it uses."""
    table = load_particles(star, project_dir)
    try:
        stacks, inverse, counts = np.unique(table.image_stack.astype(str), return_inverse=True, return_counts=True)
        by_stack = np.split(np.argsort(inverse.reshape(-1), kind="stable"), np.cumsum(counts)[:-1])
        for path, rows in zip(stacks, by_stack):
            box = _stack_box(table, rows, path, star)
            per_stack = FINITE_CHECK_BYTES // max(1, len(stacks)) // (4 * box * box)
            try:
                stack = table.stack(path)  # raises for non-MRC or non-square images
            except CryoInputError as exc:  # the stack's own message, and which particle file names it
                raise CryoInputError(f"{exc} (an image stack named in {star})") from exc
            if stack.shape[1] != box:
                raise CryoInputError(
                    f"images are {stack.shape[1]} px but {star} gives a box of {box} px (rlnImageSize, or "
                    "blob/shape of a .cs file); fix it or re-extract",
                    path=path,
                )
            used = np.unique(table.image_index[rows])
            if used[-1] >= len(stack):
                raise CryoInputError(
                    f"image {used[-1] + 1} (1-based) named in {star} is past the end of the stack, which holds "
                    f"{len(stack)} images; check the image indices (rlnImageName, or blob/idx of a .cs file)",
                    path=path,
                )
            _check_finite(stack, used, max(2, per_stack))
    finally:
        table.close()
    return table


def _check_finite(stack, used: np.ndarray, n_max: int) -> None:
    """NaN/Inf check: every used image of a small set, else an evenly spaced sample (first and last kept)."""
    if len(used) > n_max:
        used = used[np.unique(np.linspace(0, len(used) - 1, n_max).round().astype(np.int64))]
    for start in range(0, len(used), 256):
        chunk = used[start : start + 256]
        images = stack.read(chunk)
        if all_finite(images):
            continue
        finite = np.isfinite(images).all(axis=(1, 2))
        if not finite.all():
            first = int(chunk[np.flatnonzero(~finite)[0]]) + 1
            raise CryoInputError(
                f"image {first} (1-based) contains NaN or Inf pixels; re-extract the "
                "particles or drop it from the STAR file",
                path=stack.path,
            )


def check_reference(path, box: int, angpix: float, what: str = "reference") -> None:
    """Cubic, finite (read_map), same box as the particles, pixel size within 1 %."""
    data, ref_angpix = read_map(path)
    if data.shape[0] != box:
        raise CryoInputError(
            f"{what} box {data.shape[0]} px differs from the particle box {box} px; "
            f"resample it to {box} px (relion_image_handler --new_box/--rescale_angpix)",
            path=path,
        )
    if what == "reference" and abs(ref_angpix - angpix) > PIXEL_SIZE_TOLERANCE * angpix:
        raise CryoInputError(
            f"pixel size in the map header ({ref_angpix:.4f} Å) differs from the "
            f"particles' pixel size in the STAR file ({angpix:.4f} Å) by more than 1 %; rescale "
            "the reference or fix its header (relion_image_handler --angpix)",
            path=path,
        )


def check_diameter_fits(diameter: float, box: int, angpix: float) -> None:
    if diameter > box * angpix:
        raise CryoInputError(
            f"--particle_diameter {diameter:g} Å is larger than the box "
            f"({box} px × {angpix:.4g} Å = {box * angpix:.1f} Å); give a smaller diameter"
        )


def check_no_later_iterations(continue_from, output_root: str | None) -> None:
    """A run continued in its own root (no other --o) writes its next iterations under their old names: refuse when
    one of them had finished (its optimiser.star written last), which it would overwrite. RELION's --continue names
    such a run root_ctN instead; here a killed or stopped run resumes in place, and any other --o is free."""
    path = Path(continue_from)
    named = ITERATION_FILE.fullmatch(path.name)
    if named is None or (output_root and Path(output_root).resolve() != (path.parent / named[1]).resolve()):
        return
    root, it = named[1], int(named[2])
    finished = (ITERATION_FILE.fullmatch(f.name) for f in path.parent.glob(f"{root}_it*_optimiser.star"))
    later = sorted(int(m[2]) for m in finished if m is not None and m[1] == root and int(m[2]) > it)
    if later:
        raise CryoInputError(
            f"iteration {later[0]} of this run has finished after the one continued from; continuing in the same "
            f"folder would overwrite it: give a new output root with --o (e.g. --o {path.parent / root}_ct{it}, as "
            f"RELION names it) or continue from {path.parent / f'{root}_it{later[-1]:03d}_optimiser.star'}",
            path=path,
        )


def check_output_folder(folder, box: int | None, flag: str = "--o") -> None:
    """Create `folder` if needed, write and remove a temporary file there, then check the free space.
    `flag` names the option that sets the folder, for the messages."""
    folder = Path(folder)
    created = []
    probe = folder / f".cryorefine_write_test.{os.getpid()}"
    try:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # another rank of a torchrun job made it first
                continue
            created.append(p)
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
        free = shutil.disk_usage(folder).free
        need = required_free_bytes(box) if box else DISK_RESERVE_BYTES
        if free < need:
            raise CryoInputError(
                f"not enough free disk space ({free / 1e6:.0f} MB free, "
                f"{need / 1e6:.0f} MB needed); free space or choose another output "
                f"folder with {flag}",
                path=folder,
            )
    except OSError as exc:
        _cleanup(probe, created)
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise CryoInputError(
                f"output folder cannot be created: {blocker} is a file, not a folder; choose another {flag}",
                path=folder,
            ) from exc
        reason = exc.strerror or type(exc).__name__
        raise CryoInputError(
            f"output folder cannot be created or written ({reason}); choose a writable folder with {flag}", path=folder
        ) from exc
    except CryoInputError:
        _cleanup(probe, created)
        raise


def _cleanup(probe: Path, created: list) -> None:
    try:
        probe.unlink(missing_ok=True)
    except OSError:
        pass
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass


def check_random_subsets(table) -> None:
    """rlnRandomSubset: all 1/2 (kept), or absent/all 0 (drawn); a mix of 1/2 with other values stops, as RELION."""
    values = set(np.unique(np.asarray(table.random_subset)).tolist())
    if values & {1, 2} and values - {1, 2}:
        raise CryoInputError(
            f"rlnRandomSubset holds {sorted(values)}: every particle needs 1 or 2 (or remove the column for a "
            "random split)",
            table.star_path,
        )


def validate_refine_inputs(args) -> ParticleTable | None:
    """All checks, cheapest first; the output folder last so nothing is created for a bad input. Returns the particle
    table it read (None for --continue, which reads none), for the run to take instead of reading the file again."""
    if getattr(args, "dist_timeout", 1.0) <= 0:
        raise CryoInputError(f"--dist_timeout must be positive (got {args.dist_timeout} s)")
    if getattr(args, "sigma_offset", 1.0) <= 0:
        raise CryoInputError(
            f"--offset must be positive (got {args.sigma_offset} Å): the initial width of the offset prior"
        )
    if getattr(args, "min_sigma2_offset", 0.0) < 0:
        raise CryoInputError(f"--min_sigma2_offset must not be negative (got {args.min_sigma2_offset} Å²)")
    continue_from = getattr(args, "continue_from", None)
    output_root = getattr(args, "output_root", None)
    if continue_from:
        # --i/--ref/--sym/--particle_diameter come from the saved state; only the output side is checked
        folder = Path(output_root).parent if output_root else Path(continue_from).parent
        if folder.is_dir() or output_root:
            check_output_folder(folder, None)
        check_no_later_iterations(continue_from, output_root)
        return None
    for flag, name in (("--i", "particles"), ("--o", "output_root"), ("--ref", "reference")):
        if not getattr(args, name, None):
            raise CryoInputError(f"{flag} is required (or --continue run_itNNN_optimiser.star)")
    if getattr(args, "particle_diameter", None) is None:
        raise CryoInputError(
            "--particle_diameter is required: the particle's longest dimension in Å, e.g. --particle_diameter 160"
        )
    diameter = float(args.particle_diameter)
    check_diameter_sign(diameter)
    check_symmetry(getattr(args, "sym", "C1"))
    table = check_particles(args.particles)
    check_random_subsets(table)
    box, angpix = table.reference_optics.box, table.reference_optics.angpix
    check_reference(args.reference, box, angpix)
    if getattr(args, "solvent_mask", None):
        check_reference(args.solvent_mask, box, angpix, what="solvent mask")
    check_diameters_fit(diameter, table)
    check_output_folder(Path(args.output_root).parent, box)
    return table
