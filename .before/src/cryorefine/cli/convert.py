"""Convert a cryoSPARC particle file (.cs) into a RELION 3.1 particle STAR file.

Example: cryorefine convert J12/J12_particles.cs Import/particles.star
Poses (axis-angle -> ZYZ Euler angles in degrees), shifts (pixels -> Å), CTF (radians -> degrees) and optics
groups (from the exposure groups) follow pyem's csparc2star. RELION reads stacks only from .mrcs files, so each
cryoSPARC .mrc stack gets a .mrcs link (or a copy, with --copy) in the folder STEM_stacks next to the STAR file.
Run it in the RELION project directory: rlnImageName paths are written relative to it. Prints one JSON line.
"""

from __future__ import annotations

import json


def add_args(p):
    p.add_argument("cs", help="cryoSPARC particle file (.cs)")
    p.add_argument("star", help="output RELION 3.1 particle STAR file (.star)")
    p.add_argument("--copy", action="store_true", help="copy the stacks into STEM_stacks instead of linking them")
    p.add_argument(
        "--project_dir",
        default=None,
        help="cryoSPARC project folder, which the stack paths in the .cs are relative to (default: the "
        "current directory, then the .cs folder and up to three folders above it)",
    )


def main(args):
    from pathlib import Path

    from ..errors import CryoInputError
    from ..io.cs_to_star import convert_cs_to_star
    from ..validate import check_output_folder, check_particles

    if Path(args.cs).suffix != ".cs":
        raise CryoInputError("convert reads cryoSPARC particle files; give a .cs file", path=args.cs)
    if Path(args.star).suffix != ".star":
        raise CryoInputError("the output must be a .star file", path=args.star)
    check_particles(args.cs, args.project_dir)  # stacks, indices and pixels, before anything is written
    check_output_folder(Path(args.star).parent, None, flag="the output STAR path")
    print(json.dumps(convert_cs_to_star(args.cs, args.star, copy=args.copy, project_dir=args.project_dir)))
