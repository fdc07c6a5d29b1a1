"""Fourier shell correlation between two maps, over RELION's integer shells round(|k|).

Example: cryorefine fsc run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc --o fsc.star
Prints one JSON line with the resolution (Å) where the FSC first drops below 0.143 and 0.5 (null if
already at the first shell); --o writes the curve (shell, resolution Å, FSC) as .star (RELION labels)
or .csv. The maps must have the same box and pixel size (--angpix overrides both headers).

With --mask (a soft solvent mask, as relion_mask_create makes): relion_postprocess's solvent-corrected FSC. The
phases are randomised past the shell where the unmasked FSC drops below --randomize_at_fsc (or from
--randomize_at_A), and the resolution is read from the corrected curve (from the unmasked one if that reaches further,
unless --force_mask), as RELION does; the curve file gets RELION's four FSC columns.
"""

from __future__ import annotations

import json
import math
import warnings


def add_args(p):
    p.add_argument("map1", help="first map (.mrc)")
    p.add_argument("map2", help="second map (.mrc)")
    p.add_argument("--o", default=None, help="write the curve to this .star or .csv file")
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å) to use instead of the maps' headers")
    p.add_argument("--mask", default=None, help="solvent mask (.mrc, 0..1): the phase-randomisation-corrected FSC")
    p.add_argument(
        "--randomize_at_fsc", type=float, default=0.8, help="randomise phases past where the FSC drops below"
    )
    p.add_argument("--randomize_at_A", type=float, default=-1.0, help="randomise phases from this resolution (Å)")
    p.add_argument("--force_mask", action="store_true", help="keep the corrected FSC when the unmasked reaches further")
    p.add_argument("--random_seed", type=int, default=0, help="seed of the random phases")


def curve_table(curves: dict, box: int, angpix: float):
    """pandas DataFrame: shell, resolution_angst, then one column per FSC curve (d//2 + 1,) in ``curves``."""
    import pandas as pd

    from ..reconstruction.fsc import shell_to_angstrom

    shells = list(range(box // 2 + 1))
    columns = {name: c.cpu().numpy() for name, c in curves.items()}
    return pd.DataFrame(
        {"shell": shells, "resolution_angst": [shell_to_angstrom(s, box, angpix) for s in shells], **columns}
    )


STAR_LABELS = {  # our curve columns -> relion_postprocess's labels
    "fsc": "rlnFourierShellCorrelation",
    "fsc_corrected": "rlnFourierShellCorrelationCorrected",
    "fsc_unmasked": "rlnFourierShellCorrelationUnmaskedMaps",
    "fsc_masked": "rlnFourierShellCorrelationMaskedMaps",
    "fsc_random_masked": "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
}


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
                **{STAR_LABELS[c]: table[c].to_numpy() for c in table.columns if c in STAR_LABELS},
            }
        )
        write_star(path, {"fsc": df})
    else:
        raise CryoInputError("the curve file must end in .star or .csv", path=path)


def masked_curves(args, a, b, angpix: float) -> tuple[dict, float, str | None]:
    """relion_postprocess's curves for --mask, the shell the resolution is read at, and a warning or None."""
    import torch

    from ..errors import CryoInputError
    from ..io.mrc import read_map
    from ..reconstruction.fsc import resolution_shell, solvent_corrected_fsc

    mask, _ = read_map(args.mask)
    if mask.shape != a.shape:
        raise CryoInputError(f"box {mask.shape[0]} of the mask differs from the maps' {a.shape[0]}", path=args.mask)
    if mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
        raise CryoInputError(
            "mask values must lie in 0..1 (1 = protein); make it with relion_mask_create", path=args.mask
        )
    box = a.shape[0]
    from_shell = int(angpix * box / args.randomize_at_A) if args.randomize_at_A > 0 else None
    try:
        c = solvent_corrected_fsc(
            torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(mask), from_shell, args.randomize_at_fsc,
            args.random_seed,
        )  # fmt: skip
    except ValueError as e:
        raise CryoInputError(f"{e}; set the shell with --randomize_at_A") from None
    curves = {"fsc": c.corrected, "fsc_corrected": c.corrected, "fsc_unmasked": c.unmasked, "fsc_masked": c.masked,
              "fsc_random_masked": c.random_masked}  # fmt: skip
    shell, unmasked_shell = resolution_shell(c.corrected, 0.143), resolution_shell(c.unmasked, 0.143)
    if unmasked_shell > shell and not args.force_mask:
        curves["fsc"] = c.unmasked
        return curves, unmasked_shell, "the unmasked FSC reaches further than the corrected one: reporting the "
        "unmasked resolution (soften or widen the mask, or pass --force_mask)"
    if float(c.random_masked[shell]) > 0.1:
        return curves, shell, "the phase-randomised FSC is above 0.10 at the resolution found: use a softer mask"
    return curves, shell, None


def main(args):
    import torch

    from ..errors import CryoInputError
    from ..evaluation import map_resolution
    from ..io.mrc import read_map
    from ..reconstruction.fsc import resolution_angstrom, shell_to_angstrom

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
    box = int(a.shape[0])
    res = map_resolution(torch.from_numpy(a), torch.from_numpy(b), angpix)
    r = res["resolution_angst"]
    curves = {"fsc": res["fsc"]}
    if args.mask:
        curves, shell, warning = masked_curves(args, a, b, angpix)
        r = {0.5: resolution_angstrom(curves["fsc"], 0.5, box, angpix), 0.143: shell_to_angstrom(shell, box, angpix)}
        if warning:
            warnings.warn(warning, stacklevel=1)
    out = {
        "resolution_0.143_angst": None if math.isinf(r[0.143]) else round(r[0.143], 4),
        "resolution_0.5_angst": None if math.isinf(r[0.5]) else round(r[0.5], 4),
        "box": box,
        "angpix": angpix,
    }
    if args.o:
        write_curve(args.o, curve_table(curves, box, angpix), angpix, box)
        out["curve"] = args.o
    print(json.dumps(out))
