"""`cryorefine external` as a RELION External job, run by RELION 3.1.3's own pipeliner (Debian's relion_pipeliner),
and the next RELION job taking its outputs from the pipeline.

In a RELION project (default_pipeline.star), ``relion_pipeliner --addJob External`` with "External executable"
``cryorefine external refine`` and our flags as the job's parameters, then ``--RunJobs``: RELION launches the command it
builds (``--o External/job001/ --in_parts ... --in_3dref ... --ini_high 40 ... --j 1``), waits for
RELION_JOB_EXIT_SUCCESS and reads RELION_OUTPUT_NODES.star: the pipeline then holds our particles, optimiser, map and
half-map nodes with RELION 3.1's types. A PostProcess job added on that half-map node runs and finds a resolution.
A classification External job declares its K maps; a job with a bad parameter ends as failed (RELION_JOB_EXIT_FAILURE,
status 3 in the pipeline, the one-line reason in run.err); RELION's Abort (RELION_JOB_ABORT_NOW) stops a running job
with RELION_JOB_EXIT_ABORTED.
(RELION 3.1.3's pipeliner cannot add a MaskCreate job, a bug in its addScheduledJob: the test masks with
relion_mask_create.)
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import starfile

from cryorefine.cli.external import relion_generation
from cryorefine.io.star import read_star
from small_set import packaged_model_set

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_pipeliner") is None or shutil.which("relion_postprocess") is None,
        reason="RELION binaries not installed",
    ),
]

EMPTY_PIPELINE = "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n"
FINISHED, FAILED = 2, 3  # RELION 3.1's process status
COMMON = {"particle_diameter": "170", "ctf": "", "flatten_solvent": "", "healpix_order": "1", "offset_range": "2",
          "offset_step": "2", "iter": "3", "ini_high": "40"}  # fmt: skip


def env():
    """RELION runs the External executable through the shell: our entry point must be on its PATH."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def pipeliner(d, *args):
    p = subprocess.run(["relion_pipeliner", *args], cwd=d, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


def add_external(d, program: str, params: dict) -> None:
    options = [f"fn_exe == cryorefine external {program}", "in_part == particles_noposes.star",
               "in_3dref == truth.mrc", "nr_threads == 1"]  # fmt: skip
    for i, (label, value) in enumerate(params.items(), start=1):
        options += [f"param{i}_label == {label}", f"param{i}_value == {value}"]
    pipeliner(d, "--addJob", "External", "--addJobOptions", ";".join(options))


def pipeline(d) -> dict:
    blocks = starfile.read(d / "default_pipeline.star", always_dict=True)
    return {
        "status": dict(
            zip(
                blocks["pipeline_processes"]["rlnPipeLineProcessName"],
                blocks["pipeline_processes"]["rlnPipeLineProcessStatus"],
            )
        ),  # fmt: skip
        "nodes": dict(
            zip(blocks["pipeline_nodes"]["rlnPipeLineNodeName"], blocks["pipeline_nodes"]["rlnPipeLineNodeType"])
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = packaged_model_set(tmp_path_factory.mktemp("relion_external"), 120, seed=8, box=32, angpix=6.0)
    (d / "default_pipeline.star").write_text(EMPTY_PIPELINE)
    return d


def test_relion_runs_our_refinement_and_postprocesses_it(project):
    d = project
    add_external(d, "refine", COMMON)
    pipeliner(d, "--RunJobs", "External/job001/", "--sec_wait_after", "1")
    job = d / "External/job001"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), (job / "run.err").read_text()[-2000:]
    p = pipeline(d)
    assert p["status"]["External/job001/"] == FINISHED
    declared = {k: v for k, v in p["nodes"].items() if k.startswith("External/job001/")}
    assert declared == {
        "External/job001/run_data.star": 3,
        "External/job001/run_it003_optimiser.star": 9,
        "External/job001/run_class001.mrc": 6,
        "External/job001/run_half1_class001_unfil.mrc": 10,
    }
    assert all((d / name).is_file() for name in declared)
    # the next job: PostProcess on the half-map node, as the GUI would offer it
    (d / "Masks").mkdir()
    subprocess.run(["relion_mask_create", "--i", "External/job001/run_class001.mrc", "--o", "Masks/mask.mrc",
                    "--ini_threshold", "0.01", "--extend_inimask", "2", "--width_soft_edge", "3"],
                   cwd=d, check=True, capture_output=True)  # fmt: skip
    options = "fn_in == External/job001/run_half1_class001_unfil.mrc;fn_mask == Masks/mask.mrc;do_auto_bfac == No"
    pipeliner(d, "--addJob", "PostProcess", "--addJobOptions", options)
    pipeliner(d, "--RunJobs", "PostProcess/job002/", "--sec_wait_after", "1")
    assert pipeline(d)["status"]["PostProcess/job002/"] == FINISHED
    resolution = float(starfile.read(d / "PostProcess/job002/postprocess.star")["general"]["rlnFinalResolution"])
    print(f"RELION's PostProcess of our External job: {resolution:.2f} Å")
    assert 12.0 < resolution < 40.0


def test_relion_runs_our_classification(project):
    d = project
    add_external(d, "classify", {**COMMON, "K": "2", "tau2_fudge": "4", "iter": "2"})
    job = sorted((d / "External").iterdir())[-1]
    pipeliner(d, "--RunJobs", f"External/{job.name}/", "--sec_wait_after", "1")
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), (job / "run.err").read_text()[-2000:]
    declared = {k: v for k, v in pipeline(d)["nodes"].items() if k.startswith(f"External/{job.name}/")}
    root = f"External/{job.name}/run_it002"
    assert declared == {f"{root}_data.star": 3, f"{root}_optimiser.star": 9, f"{root}_class001.mrc": 6,
                        f"{root}_class002.mrc": 6}  # fmt: skip


def test_a_bad_parameter_fails_the_job_with_one_line(project):
    d = project
    add_external(d, "refine", {**COMMON, "particle_diameter": "-5"})
    job = sorted((d / "External").iterdir())[-1]
    pipeliner(d, "--RunJobs", f"External/{job.name}/", "--sec_wait_after", "1")
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert pipeline(d)["status"][f"External/{job.name}/"] == FAILED
    errors = [line for line in (job / "run.err").read_text().splitlines() if line.strip()]
    assert len(errors) == 1 and "particle_diameter" in errors[0], errors


def test_relion_abort_stops_a_running_job(project, tmp_path):
    """RELION's Abort button: RELION_JOB_ABORT_NOW in the job folder (the run is held in its iteration-2 E-step)."""
    d = project
    job = "External/job_abort/"
    params = [arg for k, v in COMMON.items() for arg in (["--" + k, v] if v else ["--" + k])]
    cmd = [sys.executable, "-m", "cryorefine.cli.main", "external", "refine", "--o", job, "--in_parts",
           "particles_noposes.star", "--in_3dref", "truth.mrc", *params, "--j", "1"]  # fmt: skip
    marker = tmp_path / "paused"
    hold = {"CRYOREFINE_TEST_PAUSE_AT": "estep:2", "CRYOREFINE_TEST_PAUSE_MARKER": str(marker)}
    p = subprocess.Popen(cmd, cwd=d, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**env(), **hold})  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.1)
    (d / job / "RELION_JOB_ABORT_NOW").touch()
    try:
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    assert rc == 143, p.stderr.read()
    assert (d / job / "RELION_JOB_EXIT_ABORTED").exists() and not (d / job / "RELION_JOB_ABORT_NOW").exists()
    assert (d / job / "run_it001_optimiser.star").exists()  # what a re-run of the job continues from


@pytest.mark.parametrize(
    "labels, generation",
    [(None, 5), (["ParticlesData.star.relion", "DensityMap.mrc"], 4), (["ParticleGroupMetadata.star.relion"], 5)],
)
def test_node_labels_follow_the_projects_relion(tmp_path, labels, generation):
    """RELION 4 and 5 name node types differently (its Browse buttons list the nodes by the first part): ours follow
    the labels already in the project's pipeline; RELION 3.1's (numbers only) or none: RELION 5's."""
    pipe = tmp_path / "default_pipeline.star"
    if labels is None:
        pipe.write_text(EMPTY_PIPELINE)
    else:
        rows = "\n".join(f"Import/job001/x{i}.star {label}" for i, label in enumerate(labels))
        pipe.write_text(
            f"data_pipeline_nodes\n\nloop_\n_rlnPipeLineNodeName #1\n_rlnPipeLineNodeTypeLabel #2\n{rows}\n"
        )
        assert read_star(pipe)["pipeline_nodes"] is not None
    assert relion_generation(pipe) == generation
