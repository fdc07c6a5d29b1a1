"""--scratch_dir (RELION's flag): the particle stacks copied to a fast local folder before the first iteration, and
read there (ParticleTable.read_from); the copies go when the run ends. The table's stacks and image names (written
to the output STARs) stay the originals."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import CryoInputError
from .table import ParticleTable

SCRATCH_MARGIN_BYTES = 1 << 30  # left free on the scratch disk


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def copy_to_scratch(table: ParticleTable, scratch_dir: str) -> tuple[ParticleTable, Path | None, str]:
    """(the table reading its stacks from copies in a new folder of ``scratch_dir``, that folder, a line for run.log).
    When the stacks do not fit the scratch disk (less SCRATCH_MARGIN_BYTES) nothing is copied: (the table as it is,
    None, the reason)."""
    stacks = sorted(set(table.image_stack.astype(str)))
    need = sum(os.path.getsize(s) for s in stacks)
    root = Path(scratch_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = free_bytes(root)
    except OSError as exc:
        raise CryoInputError(
            f"--scratch_dir cannot be used ({exc.strerror}); give a writable folder", path=root
        ) from exc
    if need > free - SCRATCH_MARGIN_BYTES:
        return (
            table,
            None,
            (
                f"--scratch_dir: the stacks ({need / 2**30:.2f} GiB) do not fit {root} ({free / 2**30:.2f} GiB free, "
                f"{SCRATCH_MARGIN_BYTES / 2**30:.0f} GiB kept); reading them where they are"
            ),
        )
    folder = root / f"cryorefine_{os.getpid()}"
    copies = {}
    try:
        folder.mkdir(exist_ok=True)
        for k, stack in enumerate(stacks):  # numbered: stacks of one name in different folders stay apart
            copies[stack] = str(folder / f"{k:05d}_{Path(stack).name}")
            shutil.copyfile(stack, copies[stack])
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise CryoInputError(
            f"--scratch_dir: copying the stacks failed ({exc.strerror}); free space there or drop --scratch_dir",
            path=root,
        ) from exc
    table.close()  # stacks opened from the originals (the input checks) are opened again from the copies
    line = f"--scratch_dir: {len(stacks)} stack(s), {need / 2**30:.2f} GiB, copied to {folder}"
    return replace(table, read_from=copies), folder, line
