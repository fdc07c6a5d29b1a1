"""cryoSPARC .cs -> RELION 3.1 particle STAR file, with image stacks under names RELION reads.

The mapping of fields is io.cryosparc's. RELION reads a stack only from a file named .mrcs (a .mrc is one image
or a volume to it), and cryoSPARC writes .mrc: each stack gets a .mrcs symbolic link (or, with copy=True, a copy)
in the folder `<STAR file stem>_stacks` next to the STAR file, and rlnImageName refers to those, relative to the
project directory (the directory RELION runs in) when they lie inside it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from cryorefine.io.atomic import atomic_write
from cryorefine.io.cryosparc import load_cs_particles
from cryorefine.io.particles import write_particles
from cryorefine.io.table import project_relative


def relion_stack_name(stack_path: str) -> str:
    """A flat .mrcs file name for a stack: its path (relative to the current directory, else absolute) with '/' -> '_'
    and the extension .mrcs ('P1/J7/extract/a.mrc' -> 'P1_J7_extract_a.mrcs')."""
    flat = project_relative(stack_path).strip(os.sep).replace(os.sep, "_")
    return os.path.splitext(flat)[0] + ".mrcs"


def _place(source: str, target: Path, copy: bool) -> None:
    """Put a link to (or a copy of) `source` at `target`, replacing what is there in one rename."""
    with atomic_write(target) as tmp:
        if copy:
            shutil.copyfile(source, tmp)
        else:
            os.symlink(os.path.abspath(source), tmp)


def convert_cs_to_star(cs_path, star_path, copy: bool = False, project_dir=None) -> dict:
    """Write `star_path` (RELION 3.1, optics table) and its .mrcs links or copies; return a summary.

    project_dir: the cryoSPARC project folder the .cs paths are relative to (see load_cs_particles); the written
    paths are relative to the current directory, RELION's project directory."""
    star_path = Path(star_path)
    table = load_cs_particles(cs_path, project_dir)
    folder = star_path.parent / f"{star_path.stem}_stacks"
    folder.mkdir(parents=True, exist_ok=True)
    stacks, inverse = np.unique(table.image_stack.astype(str), return_inverse=True)
    targets = [folder / relion_stack_name(s) for s in stacks]
    for source, target in zip(stacks, targets):
        _place(source, target, copy)
    names = np.array([project_relative(t) for t in targets], object)[inverse.reshape(-1)]
    image_name = np.array([f"{i + 1:06d}@{n}" for i, n in zip(table.image_index, names)], object)
    image_stack = np.array([os.path.abspath(t) for t in targets], object)[inverse.reshape(-1)]  # the links, named
    write_particles(star_path, replace(table, image_name=image_name, image_stack=image_stack))
    return {
        "star": str(star_path),
        "particles": len(table),
        "optics_groups": len(table.optics),
        "stacks": len(stacks),
        "stack_folder": str(folder),
        "copied": copy,
    }
