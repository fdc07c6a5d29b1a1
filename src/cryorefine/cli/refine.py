"""3D auto-refine (gold-standard MAP-EM), flags as relion_refine --auto_refine --split_random_halves.

Example: cryorefine refine --i particles.star --o out/run --ref init.mrc --ini_high 30 --particle_diameter 160 --ctf \
    --flatten_solvent
Outputs RELION's names: out/run_itNNN_{data,optimiser,sampling}.star, run_itNNN_half{1,2}_{model.star,class001.mrc},
finally run_class001.mrc, run_half{1,2}_class001_unfil.mrc, run_data.star, run_model.star, run.log and report.html.
While it runs, out/run.lock keeps a second run (or --continue) from writing to out/run at the same time.
"""

from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager

import torch

from ..errors import CryoInputError, Terminated
from ..estep.precision import PRECISIONS


def add_common_args(p, classify: bool = False) -> None:
    p.add_argument(
        "--i",
        dest="particles",
        required=False,
        help="input particles: RELION 3.0/3.1/5 STAR file or cryoSPARC .cs file",
    )
    p.add_argument("--o", dest="output_root", required=False, help="output root, e.g. Refine3D/job001/run")
    p.add_argument(
        "--ref",
        dest="reference",
        required=False,
        help="initial reference map (MRC), same box and pixel size as the particles",
    )
    p.add_argument(
        "--ini_high",
        type=float,
        default=60.0 if classify else 30.0,
        help="low-pass filter of the initial reference (Å)",
    )
    p.add_argument(
        "--particle_diameter",
        type=float,
        default=None,
        help="diameter of the circular mask on the particles (Å); required",
    )
    p.add_argument("--sym", default="C1", help="point group: C<n>, D<n>, T, O, I (RELION's axes)")
    p.add_argument(
        "--healpix_order",
        type=int,
        default=2,
        help="initial angular sampling: HEALPix order of the coarse pass (1 = 30°, 2 = 15°, 3 = 7.5° ...); "
        "the fine pass samples twice as finely, as relion_refine's oversampling",
    )
    p.add_argument("--offset_range", type=float, default=5.0, help="search range of origin offsets (pixels)")
    p.add_argument("--offset_step", type=float, default=2.0, help="step of origin offsets (pixels)")
    p.add_argument(
        "--offset",
        dest="sigma_offset",
        type=float,
        default=10.0,
        help="initial width of the Gaussian prior on origin offsets (Å), RELION's --offset",
    )
    p.add_argument(
        "--min_sigma2_offset",
        type=float,
        default=2.0,
        help="lower bound of the offset prior's variance (Å²), RELION 5's --min_sigma2_offset",
    )
    p.add_argument(
        "--sigma_ang",
        type=float,
        default=0.0,
        help="local angular searches from the start, with this Gaussian prior width on all three angles (degrees), "
        "about rlnAngleRot/Tilt/PsiPrior where the particles have them; 0 = global",
    )
    for angle, what in (("rot", "first Euler angle"), ("tilt", "second Euler angle"), ("psi", "in-plane angle")):
        p.add_argument(
            f"--sigma_{angle}",
            type=float,
            default=0.0,
            help=f"local angular searches from the start with this Gaussian prior width on the {what} (degrees; "
            f"0 = unrestricted), about rlnAngle{angle.capitalize()}Prior where the particles have it, else their "
            "current angle; --sigma_ang, if given, wins",
        )
    p.add_argument(
        "--solvent_mask", default=None, help="mask (MRC) multiplied into the references (instead of a sphere)"
    )
    p.add_argument(
        "--flatten_solvent",
        action="store_true",
        help="multiply the references by a soft sphere of --particle_diameter (or --solvent_mask)",
    )
    p.add_argument("--zero_mask", action="store_true", help="fill the particle background with zeros rather than noise")
    p.add_argument("--ctf", action="store_true", help="do CTF correction")
    p.add_argument(
        "--ctf_intact_first_peak", action="store_true", help="ignore the CTF until its first peak (RELION's flag)"
    )
    p.add_argument(
        "--ctf_phase_flipped",
        action="store_true",
        help="the images were phase-flipped: use |CTF| (also set by rlnCtfDataArePhaseFlipped 1 in data_optics)",
    )
    p.add_argument("--only_flip_phases", action="store_true", help="correct only the CTF's sign, not its amplitude")
    p.add_argument(
        "--norm",
        action="store_true",
        help="normalisation-error correction: scale each image by the average over its own residual noise level "
        "(rlnNormCorrection)",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="intensity-scale correction per micrograph group (rlnGroupName, else rlnMicrographName), as RELION",
    )
    p.add_argument("--firstiter_cc", action="store_true", help="first iteration by cross-correlation (best pose only)")
    p.add_argument("--pad", type=int, default=2, help="padding factor of the Fourier-space interpolation")
    p.add_argument(
        "--maxsig", type=int, default=0, help="at most this many significant coarse samples per particle (0 = no limit)"
    )
    p.add_argument("--random_seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--perturb", type=float, default=0.5, help="random perturbation of the sampling grid (fraction of a step)"
    )
    p.add_argument(
        "--adaptive_fraction", type=float, default=0.999, help="posterior mass of the significant coarse samples"
    )
    p.add_argument(
        "--incr_size",
        type=int,
        default=10,
        help="Fourier shells beyond the current resolution in the E-step window (shells of 1/(box·pixel size) Å⁻¹)",
    )
    p.add_argument(
        "--strict_highres_exp",
        type=float,
        default=0.0,
        help="score poses and classes with the images only up to this resolution (Å); reconstruction still uses all "
        "the current resolution, as RELION's expert option (0 = no limit)",
    )
    p.add_argument("--tau2_fudge", type=float, default=4.0 if classify else 1.0, help="regularisation parameter T")
    p.add_argument(
        "--skip_gridding",
        action="store_true",
        help="reconstruct without the 10 gridding (density-compensation) iterations: RELION >= 4's default; "
        "the default here is RELION 3.1's, with them (better maps from few particles per voxel)",
    )
    p.add_argument(
        "--iter",
        "--auto_iter_max",
        dest="max_iter",
        type=int,
        default=None,  # given or not: a continued run keeps its own unless given (config_from_args)
        help="number of iterations"
        + (" (default 25)" if classify else " at most (RELION's --auto_iter_max; auto-refine stops at convergence)"),
    )
    p.add_argument(
        "--batch",
        dest="batch_size",
        type=int,
        default=0,
        help="particles read per E-step batch (0 = automatic); the GPU works through it in tiles that fit its free "
        "memory",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="tf32",
        help="coarse-pass matrix products: tf32 (GPU tensor cores; fp32 on the CPU), fp32 or fp16 (scaled half "
        "precision); the rest stays fp32 (default: %(default)s)",
    )
    p.add_argument(
        "--gpu",
        nargs="?",
        const="",
        default=None,
        help="use CUDA: GPU 0, under torchrun GPU LOCAL_RANK; or ids, e.g. --gpu 1 or --gpu 0,1 "
        "(rank LOCAL_RANK takes the LOCAL_RANK-th)",
    )
    p.add_argument(
        "--no_image_cache",
        dest="image_cache",
        action="store_false",
        help="turn off the GPU's image cache, which keeps the particle images in GPU memory after their first read "
        "(as many as fit "
        "in a quarter of it) so that later iterations skip the stacks; image cache on (default: %(default)s)",
    )
    p.add_argument(
        "--preread_images",
        action="store_true",
        help="read every particle image into host memory before the first iteration (RELION's flag): no stack reads "
        "during the run; needs the stacks' size in free RAM",
    )
    p.add_argument(
        "--scratch_dir",
        default="",
        help="copy the particle stacks to this (fast, local) folder before the first iteration and read them there "
        "(RELION's flag); the copies are removed when the run ends, and the output STARs keep the original names",
    )
    p.add_argument(
        "--gpu_memory",
        dest="gpu_memory_gib",
        type=float,
        default=0.0,
        help="use at most this much of each GPU (GiB, per process): for shared GPUs, or to leave room; 0 = all of it",
    )
    p.add_argument("--j", dest="threads", type=int, default=0, help="CPU threads (0 = PyTorch's default)")
    p.add_argument(
        "--continue",
        dest="continue_from",
        default=None,
        help="continue from run_itNNN_optimiser.star: the other inputs and settings come from the saved run, its "
        "files go on in its folder unless --o gives a new output root, and --iter (if given) a new iteration limit",
    )
    p.add_argument(
        "--dist_timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others (joining, combining an iteration) before the job "
        "stops",
    )
    p.add_argument(
        "--max_seconds",
        type=float,
        default=0.0,
        help="stop cleanly, after a finished iteration, before one that would end "
        "past this many seconds of this call (estimated from the last iteration); resume with --continue; 0 = no limit",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=1,
        help="accepted for RELION users (particles per thread pool); batches are set by --batch",
    )
    p.add_argument(
        "--oversampling",
        type=int,
        default=1,
        help="adaptive oversampling order; 1 (RELION's default) is the only one supported",
    )


def add_args(p):
    add_common_args(p)
    p.add_argument(
        "--auto_local_healpix_order",
        type=int,
        default=4,
        help="HEALPix order from which searches are local (4 = 3.75° coarse step)",
    )
    p.add_argument(
        "--low_resol_join_halves",
        type=float,
        default=40.0,
        help="join the half maps below this resolution (Å); RELION's CLI default is off, its GUI 40 Å; 0 = off",
    )
    p.add_argument(
        "--solvent_correct_fsc",
        action="store_true",
        help="each iteration's FSC (resolution and regularisation) from the unregularised half maps under "
        "--solvent_mask, corrected for the mask by phase randomisation, as relion_postprocess; needs --solvent_mask",
    )
    p.add_argument("--auto_refine", action="store_true", help="accepted for RELION users (always on)")
    p.add_argument("--split_random_halves", action="store_true", help="accepted for RELION users (always on)")


def device_from_args(args) -> str:
    from ..parallel.context import local_rank, rank_device

    return rank_device(args.gpu, local_rank(), torch.cuda.device_count() if args.gpu is not None else 0)


# what a continued run takes from its command line; every other setting is the saved run's
ON_CONTINUE = {
    "continue_from",
    "output_root",
    "max_iter",
    "gpu",
    "threads",
    "max_seconds",
    "image_cache",
    "gpu_memory_gib",
    "preread_images",
    "scratch_dir",
    "batch_size",
    "dist_timeout",
    "pool",  # accepted for RELION users, no effect
    "auto_refine",
    "split_random_halves",
}


def refuse_settings_on_continue(args, saved: dict) -> None:
    """A setting given with --continue (other than its default) that differs from the ``saved`` run's stops the
    command with one line: the continued run keeps its own, and the given one would be silently dropped."""
    options = getattr(args, "_options", {})
    dropped = sorted(
        flag
        for k, (flag, default) in options.items()
        if k not in ON_CONTINUE and hasattr(args, k) and (v := getattr(args, k)) != default and v != saved.get(k)
    )
    if dropped:
        raise CryoInputError(
            f"{', '.join(dropped)}: a continued run keeps the settings it was started with (only --o, --iter and the "
            "run-time options --gpu, --j, --batch, --max_seconds, --gpu_memory, --scratch_dir and the image cache "
            "change); drop them, or start a new run from the last iteration's map (--ref)",
            path=args.continue_from,
        )


def config_from_args(args, cls):
    import dataclasses

    if getattr(args, "oversampling", 1) != 1:
        raise CryoInputError(
            f"--oversampling {args.oversampling} is not supported: the fine pass is RELION's order 1 "
            "(8 rotations x 4 translations per coarse sample); pass --oversampling 1"
        )
    if getattr(args, "strict_highres_exp", 0.0) < 0:
        raise CryoInputError("--strict_highres_exp must be 0 (no limit) or a resolution in Å")
    if getattr(args, "max_seconds", 0.0) < 0:
        raise CryoInputError("--max_seconds must be 0 (no limit) or positive")
    if getattr(args, "gpu_memory_gib", 0.0) < 0:
        raise CryoInputError("--gpu_memory must be 0 (all of the GPU) or positive (GiB)")

    if args.continue_from:
        from ..refine.state import read_state

        saved = read_state(args.continue_from)["config"]
        refuse_settings_on_continue(args, saved)
        # a new output root and iteration limit, where given, as RELION's --continue takes them (else the run's own:
        # its files go on in its folder)
        saved.update({k: v for k in ("output_root", "max_iter") if (v := getattr(args, k)) is not None})
        if args.batch_size:  # given (0, the default, is automatic): else the run's own batches
            saved["batch_size"] = args.batch_size
        saved.update(
            continue_from=args.continue_from,
            device=device_from_args(args),
            threads=args.threads,
            max_seconds=args.max_seconds,
            image_cache=args.image_cache,
            gpu_memory_gib=args.gpu_memory_gib,
            preread_images=args.preread_images,
            scratch_dir=args.scratch_dir,
        )
        return cls(
            **{
                k: v
                for k, v in saved.items()
                if k in {f.name for f in dataclasses.fields(cls)} and k not in ("angpix",)
            }
        )
    if getattr(args, "solvent_correct_fsc", False) and not args.solvent_mask:
        raise CryoInputError("--solvent_correct_fsc corrects the FSC for a mask: give it with --solvent_mask")
    for flag, name in (("--i", "particles"), ("--o", "output_root"), ("--ref", "reference")):
        if not getattr(args, name):
            raise CryoInputError(f"{flag} is required (or --continue run_itNNN_optimiser.star)")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in fields and not (k == "max_iter" and v is None)}
    values["device"] = device_from_args(args)
    return cls(**values)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_raises():
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread while the block runs, so that a stopped
    run ends as after Ctrl-C: its files finished, its output lock released. Only where SIGTERM would otherwise kill
    the process outright (the default handler, in the main thread); under torchrun, parallel/context.distributed
    installs its own, which raises too."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_job(args, config_cls, run_mode) -> None:
    """Validate, then run the mode in this process (or as one rank of a torchrun job); rank 0 prints the summary."""
    from ..parallel.context import distributed
    from ..thread_switches import prompt_thread_switches
    from ..validate import validate_refine_inputs

    with prompt_thread_switches():  # from here on the run shares the interpreter with threads of its own
        table = validate_refine_inputs(args)  # user mistakes stop here, before the engine is imported or run
        cfg = config_from_args(args, config_cls)
        if cfg.device.startswith("cuda"):
            from .. import cuda_libraries
            from ..projection import triton_cache_key

            cuda_libraries.use_expandable_segments(cfg.device)  # before any allocation, the threads' included
            triton_cache_key.start()
            if table is not None:  # (a --continue reads its table later)
                cuda_libraries.start(cfg.device, table.reference_optics.box)
        with sigterm_raises(), distributed(cfg.device, args.dist_timeout) as dist:
            summary = run_mode(cfg, dist, table)  # holds the output lock (refine/context.output_lock) while it runs
            if dist.is_main:
                print(json.dumps(summary))


def main(args):
    from ..refine.auto_refine import refine
    from ..refine.config import RefineConfig

    run_job(args, RefineConfig, refine)
