"""3D classification into K classes (RELION's relion_refine --K without --auto_refine).

Example: cryorefine classify --i particles.star --o Class3D/run --ref init.mrc --K 3 --iter 25 --tau2_fudge 4 \
    --ini_high 40 --particle_diameter 160 --ctf
Outputs: run_itNNN_classKKK.mrc, run_itNNN_model.star (class distribution, per-class resolution),
run_itNNN_data.star (rlnClassNumber, rlnMaxValueProbDistribution), run_itNNN_optimiser.star, run.log, report.html.
While it runs, Class3D/run.lock keeps a second run (or --continue) from writing to Class3D/run at the same time.
"""

from __future__ import annotations

from .refine import add_common_args, run_job


def add_args(p):
    add_common_args(p, classify=True)
    p.add_argument("--K", type=int, default=3, help="number of classes")
    p.add_argument(
        "--skip_align",
        action="store_true",
        help="keep each particle's orientation and offset from the STAR file (e.g. a consensus refinement's "
        "run_data.star) and search only the classes: RELION's focused classification without alignment",
    )
    p.add_argument(
        "--skip_rotate",
        action="store_true",
        help="keep each particle's orientation from the STAR file and search the classes and the offsets (about its "
        "offset, --offset_range/--offset_step)",
    )


def main(args):
    from ..refine.classify3d import ClassifyConfig, classify

    run_job(args, ClassifyConfig, classify)
