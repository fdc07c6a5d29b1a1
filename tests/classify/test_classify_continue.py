"""--continue of a 3D classification after SIGKILL at every stage, as tests/refine/test_continue.py does for
auto-refine: killed in iteration 2's E-step, its M-step (after the first class's map) or while writing its files, the
run leaves only complete files under final names; continued from iteration 1's optimiser.star it repeats iteration 2
as the uninterrupted run did (same poses, classes and maps) and ends with the same output set and classes.
"""

import sys

import numpy as np
import pytest

from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_star
from killed_runs import kill_then_continue, set_and_uninterrupted_run

BOX, ANGPIX, K = 32, 6.0, 2
KILL_AT = {  # stage -> CRYOREFINE_TEST_PAUSE_AT, all in iteration 2 of 3
    "E-step": "estep:2",
    "M-step": "mstep:2",
    "writing files": "write:run_it002_model.star",
}
CLI = [sys.executable, "-m", "cryorefine.cli.main", "classify"]


def _cmd(d, out):
    flags = (
        f"--K {K} --iter 3 --tau2_fudge 4 --ini_high 30 --particle_diameter 170 --ctf --flatten_solvent "
        "--healpix_order 1 --offset_range 2 --offset_step 1 --random_seed 3 --j 1"
    )
    return [*CLI, "--i", str(d / "particles_noposes.star"), "--o", str(out / "run"), "--ref", str(d / "start.mrc"),
            *flags.split()]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return set_and_uninterrupted_run(tmp_path_factory, "classify_cont", 6, BOX, ANGPIX, _cmd)


@pytest.mark.parametrize("stage", list(KILL_AT))
def test_killed_classification_continues_and_repeats_the_iteration(data, stage, tmp_path):
    d, ref = data
    out = tmp_path / "run"
    written = (".run_it002_model.tmp*.star", "run_it002_class001.mrc") if stage == "writing files" else None
    resume = [*CLI, "--continue", str(out / "run_it001_optimiser.star"), "--j", "1"]
    kill_then_continue(
        _cmd(d, out), resume, KILL_AT[stage], out, ref, BOX, tmp_path / "paused", "run_it003_model.star", written
    )
    for it in (2, 3):  # the repeated iteration and the one after it, as in the uninterrupted run
        a = read_star(ref / f"run_it{it:03d}_data.star")["particles"]
        b = read_star(out / f"run_it{it:03d}_data.star")["particles"]
        assert (a["rlnClassNumber"].to_numpy() == b["rlnClassNumber"].to_numpy()).all(), it
        for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
            np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), atol=1e-3, err_msg=f"{col} it {it}")
        for k in range(1, K + 1):
            ma, mb = (read_map(f / f"run_it{it:03d}_class{k:03d}.mrc")[0] for f in (ref, out))
            np.testing.assert_allclose(mb, ma, atol=1e-4 * np.abs(ma).max())
    ca = read_star(ref / "run_it003_model.star")["model_classes"]["rlnClassDistribution"].to_numpy(dtype=float)
    cb = read_star(out / "run_it003_model.star")["model_classes"]["rlnClassDistribution"].to_numpy(dtype=float)
    np.testing.assert_allclose(cb, ca, atol=1e-5)
