"""Run `refine` or `classify` as a RELION External job (RELION 3.1, 4 and 5), so the next RELION job takes its outputs.

In RELION's GUI: job type External; "External executable": `cryorefine external refine` (or `... classify`); "Input
particles": the particles STAR; "Input 3D reference": the start map; optional "Input 3D mask" (used as --solvent_mask);
"Param1 label" ini_high, "Param1 value" 40, and so on: each label is one of our flags without its dashes (a label
with an empty value is a switch, e.g. ctf, flatten_solvent, gpu). RELION runs

    cryorefine external refine --o External/job012/ --in_parts Extract/job007/particles.star \
        --in_3dref InitialModel/job009/initial_model.mrc --ini_high 40 --ctf --j 4

which runs `cryorefine refine --i ... --o External/job012/run --ref ... --ini_high 40 --ctf --j 4` in that folder. The
outputs keep RELION's names (run_data.star, run_class001.mrc, run_half1_class001_unfil.mrc, run_itNNN_optimiser.star;
classification: the last iteration's run_itNNN_data.star, _optimiser.star and _classKKK.mrc), are declared in
RELION_OUTPUT_NODES.star with the node types of RELION 3.1 (numbers) and of RELION 4 or 5 (labels; which ones is read
from the project's default_pipeline.star, else 5's), and the job ends with RELION_JOB_EXIT_SUCCESS, or
RELION_JOB_EXIT_FAILURE with the reason in run.err. RELION's Abort (RELION_JOB_ABORT_NOW) stops the run after its
current step: RELION_JOB_EXIT_ABORTED. Run the job again (RELION's "Continue"/re-run) to resume from its last
finished iteration.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

import pandas as pd

ROOT_NAME = "run"  # RELION's file names inside the job folder: run_data.star, run_class001.mrc, ...
ABORT_POLL_SECONDS = 2.0

# node kind -> (RELION 3.1's number, RELION 4's label, RELION 5's label) of a Refine3D or Class3D job's outputs
NODE_TYPES = {
    ("refine", "particles"): (3, "ParticlesData.star.relion.refine3d", "ParticleGroupMetadata.star.relion.refine3d"),
    ("refine", "optimiser"): (9, "ProcessData.star.relion.optimiser.refine3d", "OptimiserData.star.relion.refine3d"),
    ("refine", "map"): (6, "DensityMap.mrc.relion.refine3d", "DensityMap.mrc.relion.refine3d"),
    ("refine", "halfmap"): (10, "DensityMap.mrc.relion.halfmap.refine3d", "DensityMap.mrc.relion.halfmap.refine3d"),
    ("classify", "particles"): (3, "ParticlesData.star.relion.class3d", "ParticleGroupMetadata.star.relion.class3d"),
    ("classify", "optimiser"): (9, "ProcessData.star.relion.optimiser.class3d", "OptimiserData.star.relion.class3d"),
    ("classify", "map"): (6, "DensityMap.mrc.relion.class3d", "DensityMap.mrc.relion.class3d"),
}
# the first part of node labels only RELION 4 uses (RELION 5 renamed them)
RELION4_FAMILIES = ("ParticlesData", "ProcessData", "MicrographsData", "MicrographMoviesData", "MicrographsCoords",
                    "ImagesData")  # fmt: skip


def add_args(p):
    p.add_argument("program", choices=["refine", "classify"], help="what the External job runs")
    p.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="RELION's --o JOBDIR/ --in_parts STAR --in_3dref MRC [--in_mask MRC] --j N, then the job's parameters "
        "as our flags (--ini_high 40 --ctf ...)",
    )


def relion_args(options: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """RELION's own flags of an External job, and the rest (the job's parameters, passed on)."""
    p = argparse.ArgumentParser(prog="cryorefine external", add_help=False)
    p.add_argument("--o", required=True)
    for flag in ("--in_parts", "--in_3dref", "--in_mask", "--in_movies", "--in_mics", "--in_coords"):
        p.add_argument(flag, default=None)
    p.add_argument("--j", default=None)
    p.add_argument("--pipeline_control", default=None)  # RELION adds it to commands naming relion_: nothing to do
    return p.parse_known_args(options)


def cryorefine_argv(program: str, job: argparse.Namespace, rest: list[str]) -> list[str]:
    """Our command line for the External job (refine or classify in the job folder; --continue from its last
    finished iteration when an earlier run of this job left one)."""
    from ..errors import CryoInputError

    for flag in ("in_movies", "in_mics", "in_coords"):
        if getattr(job, flag):
            raise CryoInputError(f"--{flag} is not an input of cryorefine {program}; give particles and a 3D reference")
    threads = ["--j", job.j] if job.j else []
    done = sorted(Path(job.o).glob(f"{ROOT_NAME}_it[0-9][0-9][0-9]_optimiser.star"))
    if done:
        return [program, "--continue", str(done[-1]), *threads]
    if not job.in_parts or not job.in_3dref:
        raise CryoInputError('the External job needs "Input particles" and "Input 3D reference"')
    mask = ["--solvent_mask", job.in_mask] if job.in_mask else []
    return [program, "--i", job.in_parts, "--o", str(Path(job.o) / ROOT_NAME), "--ref", job.in_3dref, *mask, *threads,
            *rest]  # fmt: skip


def relion_generation(pipeline: Path = Path("default_pipeline.star")) -> int:
    """4 or 5: whose node labels the project's pipeline uses (5 without a pipeline or labels, e.g. RELION 3.1's)."""
    from ..io.star import read_star

    try:
        nodes = read_star(pipeline).get("pipeline_nodes")
    except Exception:  # no pipeline, or one we cannot read: the labels are only a hint
        return 5
    if nodes is None or "rlnPipeLineNodeTypeLabel" not in nodes.columns:
        return 5
    labels = nodes["rlnPipeLineNodeTypeLabel"].astype(str)
    return 4 if labels.str.startswith(RELION4_FAMILIES).any() else 5


def output_nodes(program: str, jobdir: Path) -> list[tuple[str, str]]:
    """(file, node kind) of a finished run's outputs, as RELION's own Refine3D/Class3D jobs declare them."""
    root = jobdir / ROOT_NAME
    last = sorted(jobdir.glob(f"{ROOT_NAME}_it[0-9][0-9][0-9]_optimiser.star"))[-1].name[: -len("_optimiser.star")]
    if program == "refine":
        return [(f"{root}_data.star", "particles"), (str(jobdir / f"{last}_optimiser.star"), "optimiser"),
                (f"{root}_class001.mrc", "map"), (f"{root}_half1_class001_unfil.mrc", "halfmap")]  # fmt: skip
    maps = sorted(jobdir.glob(f"{last}_class[0-9][0-9][0-9].mrc"))
    return [(str(jobdir / f"{last}_data.star"), "particles"), (str(jobdir / f"{last}_optimiser.star"), "optimiser"),
            *[(str(m), "map") for m in maps]]  # fmt: skip


def write_output_nodes(program: str, jobdir: Path) -> None:
    from ..io.star import write_star

    generation = relion_generation()
    nodes = output_nodes(program, jobdir)
    table = pd.DataFrame(
        {
            "rlnPipeLineNodeName": [name for name, _ in nodes],
            "rlnPipeLineNodeType": [NODE_TYPES[program, kind][0] for _, kind in nodes],
            "rlnPipeLineNodeTypeLabel": [NODE_TYPES[program, kind][generation - 3] for _, kind in nodes],
        }
    )
    write_star(jobdir / "RELION_OUTPUT_NODES.star", {"output_nodes": table})


def _watch_for_abort(jobdir: Path, stop: threading.Event) -> None:
    """RELION's Abort button creates RELION_JOB_ABORT_NOW: stop the run as SIGTERM does (after its current step)."""
    while not stop.wait(ABORT_POLL_SECONDS):
        if (jobdir / "RELION_JOB_ABORT_NOW").exists():
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(args) -> int:
    from .main import main as cryorefine

    job, rest = relion_args(args.options)
    jobdir = Path(job.o)
    jobdir.mkdir(parents=True, exist_ok=True)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for the job
    stop = threading.Event()
    threading.Thread(target=_watch_for_abort, args=(jobdir, stop), daemon=True).start()
    status, rc = "RELION_JOB_EXIT_FAILURE", 2
    try:  # a mistake in the job's inputs or parameters raises here: RELION sees the failure, run.err the line
        rc = cryorefine(cryorefine_argv(args.program, job, rest))
        if rc == 0:
            if is_main:
                write_output_nodes(args.program, jobdir)  # before the exit file, which RELION polls for
            status = "RELION_JOB_EXIT_SUCCESS"
        elif (jobdir / "RELION_JOB_ABORT_NOW").exists():
            status = "RELION_JOB_EXIT_ABORTED"
    finally:
        stop.set()
        if is_main:
            if status == "RELION_JOB_EXIT_ABORTED":
                (jobdir / "RELION_JOB_ABORT_NOW").unlink(missing_ok=True)
            (jobdir / status).touch()
    return rc
