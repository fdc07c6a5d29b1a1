"""Pose and map errors of a refinement against the truth (e.g. from `cryorefine simulate`).

Example: cryorefine evaluate --data Refine3D/run_data.star --truth sim/particles.star \
    --map Refine3D/run_class001.mrc --truth_map sim/truth.mrc --sym C1
Particles are matched by rlnImageName. Prints one JSON line: matched count, median and 90th
percentile angular error (deg, minimised over the --sym equivalents) and shift error (Å), and with
maps the resolution (Å) where the FSC to the truth drops below 0.5 and 0.143. Maps are compared as
they are: no alignment, so use the frame and hand of the truth.
"""

from __future__ import annotations

import json
import math


def add_args(p):
    p.add_argument("--data", required=True, help="refined particle STAR file (e.g. run_data.star)")
    p.add_argument("--truth", required=True, help="STAR file with the true poses (e.g. particles.star of a simulation)")
    p.add_argument("--map", default=None, help="refined map (.mrc)")
    p.add_argument("--truth_map", default=None, help="true map (.mrc), same box and pixel size")
    p.add_argument("--sym", default="C1", help="point group: angular errors are minimised over its equivalent poses")


def _finite(x):
    return None if math.isinf(x) else round(x, 4)


def main(args):
    import torch

    from ..errors import CryoInputError
    from ..evaluation import map_resolution, pose_errors, read_poses, summarise_pose_errors
    from ..io.mrc import read_map

    if (args.map is None) != (args.truth_map is None):
        raise CryoInputError("give both --map and --truth_map, or neither")
    out = summarise_pose_errors(pose_errors(read_poses(args.data), read_poses(args.truth), args.sym))
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    if args.map is not None:
        (m, pm), (t, pt) = read_map(args.map), read_map(args.truth_map)
        if m.shape != t.shape:
            raise CryoInputError(f"box {m.shape[0]} of {args.map} differs from box {t.shape[0]} of {args.truth_map}")
        if abs(pm - pt) > 1e-3 * max(pm, pt):
            raise CryoInputError(f"pixel size {pm:.4f} Å of {args.map} differs from {pt:.4f} Å of {args.truth_map}")
        r = map_resolution(torch.from_numpy(m), torch.from_numpy(t), pt)["resolution_angst"]
        out["map_fsc_0.5_angst"] = _finite(r[0.5])
        out["map_fsc_0.143_angst"] = _finite(r[0.143])
    print(json.dumps(out))
