"""Fourier shell correlation between two maps, over RELION's integer shells round(|k|).

Example: cryorefine fsc run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc --o fsc.star
Prints one JSON line with the resolution (Å) where the FSC first drops below 0.143 and 0.5 (null if
already at the first shell); --o writes the curve (shell, resolution Å, FSC) as .star (RELION labels)
or .csv. The maps must have the same box and pixel size (--angpix overrides both headers).
"""

from __future__ import annotations

import json
import math


def add_args(p):
    p.add_argument("map1", help="first map (.mrc)")
    p.add_argument("map2", help="second map (.mrc)")
    p.add_argument("--o", default=None, help="write the curve to this .star or .csv file")
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å) to use instead of the maps' headers")


def curve_table(fsc, box: int, angpix: float):
    """pandas DataFrame (shell, resolution_angst, fsc) for shells 0 .. d//2 (shell 0: resolution inf)."""
    import pandas as pd

    from ..reconstruction.fsc import shell_to_angstrom

    shells = list(range(len(fsc)))
    return pd.DataFrame(
        {
            "shell": shells,
            "resolution_angst": [shell_to_angstrom(s, box, angpix) for s in shells],
            "fsc": fsc.cpu().numpy(),
        }
    )


def write_curve(path: str, table, angpix: float, box: int) -> None:
    import numpy as np
    import pandas as pd

    from ..errors import CryoInputError
    from ..io.star import write_star

    if path.endswith(".csv"):
        table.to_csv(path, index=False, float_format="%.6g")
    elif path.endswith(".star"):
        df = pd.DataFrame(
            {
                "rlnSpectralIndex": table["shell"].to_numpy(),
                "rlnResolution": table["shell"].to_numpy() / (box * angpix),
                "rlnAngstromResolution": np.where(
                    np.isinf(table["resolution_angst"]), 999.0, table["resolution_angst"]
                ),
                "rlnFourierShellCorrelation": table["fsc"].to_numpy(),
            }
        )
        write_star(path, {"fsc": df})
    else:
        raise CryoInputError("the curve file must end in .star or .csv", path=path)


def main(args):
    import torch

    from ..errors import CryoInputError
    from ..evaluation import map_resolution
    from ..io.mrc import read_map

    (a, pa), (b, pb) = read_map(args.map1), read_map(args.map2)
    if a.shape != b.shape:
        raise CryoInputError(
            f"box {a.shape[0]} of {args.map1} differs from box {b.shape[0]} of {args.map2}; "
            "resample one (relion_image_handler --new_box)"
        )
    if args.angpix is not None:
        if args.angpix <= 0:
            raise CryoInputError("--angpix must be positive")
        angpix = args.angpix
    else:
        if abs(pa - pb) > 1e-3 * max(pa, pb):
            raise CryoInputError(
                f"pixel size {pa:.4f} Å of {args.map1} differs from {pb:.4f} Å of {args.map2}; "
                "rescale one, or pass --angpix if a header is wrong"
            )
        angpix = pa
        if angpix <= 0:
            raise CryoInputError(f"{args.map1} has no pixel size in its header; pass --angpix")
    res = map_resolution(torch.from_numpy(a), torch.from_numpy(b), angpix)
    r = res["resolution_angst"]
    out = {
        "resolution_0.143_angst": None if math.isinf(r[0.143]) else round(r[0.143], 4),
        "resolution_0.5_angst": None if math.isinf(r[0.5]) else round(r[0.5], 4),
        "box": int(a.shape[0]),
        "angpix": angpix,
    }
    if args.o:
        write_curve(args.o, curve_table(res["fsc"], a.shape[0], angpix), angpix, a.shape[0])
        out["curve"] = args.o
    print(json.dumps(out))
