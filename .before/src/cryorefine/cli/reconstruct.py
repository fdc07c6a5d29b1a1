"""Reconstruct a map from particles with known poses (like relion_reconstruct).

Example: cryorefine reconstruct --i particles.star --o map.mrc --ctf --sym C2
Image stacks are found as RELION finds them: relative to the project directory (--project_dir,
default the current directory), then to the STAR file's folder. Prints a JSON line with the box,
pixel size and particle count.
"""

from __future__ import annotations

import json
import math


def add_args(p):
    p.add_argument("--i", required=True, help="particles with poses: RELION 3.0/3.1 STAR file or cryoSPARC .cs file")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--sym", default="C1", help="point group (C<n>, D<n>, T, O, I) on RELION's axes")
    p.add_argument("--ctf", action="store_true", help="correct for the CTF (back-project CTF·image, weight CTF²)")
    p.add_argument("--pad", type=int, default=2, help="padding factor of the Fourier grid")
    p.add_argument("--subset", type=int, default=-1, help="1 or 2: only that random half (rlnRandomSubset); other: all")
    p.add_argument("--batch", type=int, default=256, help="images per batch")
    p.add_argument(
        "--project_dir",
        default=None,
        help="folder the stack paths in rlnImageName are relative to (default: current directory)",
    )
    p.add_argument(
        "--skip_gridding",
        action="store_true",
        help="divide by the weights instead of 10 gridding iterations (relion_reconstruct's --skip_gridding)",
    )
    p.add_argument(
        "--maxres",
        type=float,
        default=-1.0,
        help="highest resolution (Å) back-projected and reconstructed (relion_reconstruct's --maxres; default Nyquist)",
    )
    p.add_argument("--gpu", action="store_true", help="compute on the first CUDA device")


def main(args):
    from pathlib import Path

    import torch

    from ..errors import CryoInputError
    from ..io.mrc import write_map
    from ..reconstruction.from_particles import reconstruct_from_particles
    from ..reconstruction.reconstruct import GRIDDING_ITERATIONS
    from ..validate import check_one_pixel_size, check_output_folder, check_particles

    if args.pad < 1 or args.batch < 1:
        raise CryoInputError("--pad and --batch must be at least 1")
    if args.maxres == 0:
        raise CryoInputError("--maxres must be a resolution in Å (or negative for Nyquist)")
    if args.gpu and not torch.cuda.is_available():
        raise CryoInputError("--gpu given but no CUDA device is available; drop --gpu")
    if not str(args.o).endswith((".mrc", ".map")):
        raise CryoInputError("output map must end in .mrc or .map", path=args.o)
    table = check_particles(args.i, args.project_dir)  # user mistakes stop here, before the heavy work
    check_output_folder(Path(args.o).parent, None)
    subset = args.subset if args.subset in (1, 2) else None
    vol, angpix = reconstruct_from_particles(
        table,
        sym=args.sym,
        ctf=args.ctf,
        pad=args.pad,
        batch=args.batch,
        device="cuda" if args.gpu else None,
        subset=subset,
        gridding_iterations=0 if args.skip_gridding else GRIDDING_ITERATIONS,
        max_shell=math.ceil(table.box * check_one_pixel_size(table) / args.maxres) if args.maxres > 0 else None,
    )
    write_map(args.o, vol.cpu().numpy(), angpix)
    n = int((table.random_subset == subset).sum()) if subset else len(table)
    print(
        json.dumps(
            {
                "map": str(args.o),
                "box": table.box,
                "angpix": angpix,
                "n_particles": n,
                "sym": args.sym,
                "ctf": bool(args.ctf),
            }
        )
    )
