"""--continue after SIGKILL: a run killed during the E-step, during the M-step or while writing files leaves only
complete files under final names; continued from its last finished iteration, it repeats the interrupted
iteration as the uninterrupted run did and ends with the full output set at the same resolution.

The kill lands at a named point: CRYOREFINE_TEST_PAUSE_AT makes the run write a marker file there and sleep
(cryorefine.debug_hooks); the test waits for the marker, then sends SIGKILL.
"""

import sys

import numpy as np
import pytest

from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_star
from killed_runs import kill_then_continue, set_and_uninterrupted_run
from small_set import small_run_flags

BOX, ANGPIX = 32, 6.0
KILL_AT = {  # stage -> CRYOREFINE_TEST_PAUSE_AT, all in iteration 2 of 3
    "E-step": "estep:2",
    "M-step": "mstep:2",
    "writing files": "write:run_it002_data.star",
}


def _cmd(d, out, *extra):
    return [
        sys.executable,
        "-m",
        "cryorefine.cli.main",
        "refine",
        *small_run_flags(d, out),
        "--iter",
        "3",
        "--random_seed",
        "3",
        "--j",
        "1",
        *extra,
    ]


def _continue_cmd(out, optimiser):
    return [sys.executable, "-m", "cryorefine.cli.main", "refine", "--continue", str(optimiser), "--j", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return set_and_uninterrupted_run(tmp_path_factory, "cont", 5, BOX, ANGPIX, _cmd)


def resolution_shell(model_star):
    general = read_star(model_star)["model_general"]
    return BOX * ANGPIX / float(general["rlnCurrentResolution"].iloc[0])


@pytest.mark.parametrize("stage", list(KILL_AT))
def test_killed_run_continues_and_repeats_the_iteration(data, stage, tmp_path):
    d, ref = data
    out = tmp_path / "run"
    written = (".run_it002_data.tmp*.star", "run_it002_half1_class001.mrc") if stage == "writing files" else None
    resume = _continue_cmd(out, out / "run_it001_optimiser.star")
    kill_then_continue(
        _cmd(d, out), resume, KILL_AT[stage], out, ref, BOX, tmp_path / "paused", "run_class001.mrc", written
    )
    # the repeated iteration 2 as in the uninterrupted run (same random state)
    a, b = read_star(ref / "run_it002_data.star")["particles"], read_star(out / "run_it002_data.star")["particles"]
    for col in [
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnMaxValueProbDistribution",
    ]:
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), atol=1e-3, err_msg=col)
    for h in (1, 2):
        ma, mb = (
            read_map(ref / f"run_it002_half{h}_class001.mrc")[0],
            read_map(out / f"run_it002_half{h}_class001.mrc")[0],
        )
        np.testing.assert_allclose(mb, ma, atol=1e-4 * np.abs(ma).max())
    assert abs(resolution_shell(out / "run_model.star") - resolution_shell(ref / "run_model.star")) <= 1.0
    ma, mb = read_map(ref / "run_class001.mrc")[0], read_map(out / "run_class001.mrc")[0]
    assert np.corrcoef(ma.ravel(), mb.ravel())[0, 1] > 0.999


def test_optimiser_star_is_written_last(data):
    """An iteration's optimiser.star (what --continue takes) comes after all of that iteration's outputs."""
    _, ref = data
    for it in (1, 2, 3):
        optimiser = ref / f"run_it{it:03d}_optimiser.star"
        outputs = [f for f in ref.glob(f"run_it{it:03d}_*") if f != optimiser]
        if it == 3:  # the final iteration also writes the run's final outputs
            outputs += [f for f in ref.glob("run_*") if not f.name.startswith("run_it")]
        assert outputs and max(f.stat().st_mtime_ns for f in outputs) <= optimiser.stat().st_mtime_ns


def test_a_checkpoint_from_before_the_micrograph_scales_continues(data, tmp_path):
    """A run_itNNN_state.pt written before the scales were per micrograph group (its statistics: σ², a tensor of
    per-optics-group scales, the offset prior; no data-to-prior ratio) still continues."""
    import subprocess

    import torch

    from cryorefine.mstep.statistics import ModelStatistics

    d, _ = data
    old = tmp_path / "old"  # a run of its own: a continued run writes where its checkpoint's run did
    subprocess.run(_cmd(d, old), check=True, capture_output=True)
    for f in old.glob("run_it003_*"):
        f.unlink()
    state = torch.load(old / "run_it002_state.pt", weights_only=False)
    stats = []
    for s in state["stats"]:
        before = object.__new__(ModelStatistics)  # the old layout, as its pickle unpickles
        before.__dict__.update(sigma2=s.sigma2, scale=torch.ones(1, dtype=torch.float64),
                               sigma2_offset_angst2=s.sigma2_offset_angst2)  # fmt: skip
        stats.append(before)
    torch.save({**state, "stats": stats}, old / "run_it002_state.pt")
    done = subprocess.run(_continue_cmd(old, old / "run_it002_optimiser.star"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (old / "run_it003_optimiser.star").is_file()


def test_continue_writes_to_a_new_output_root_and_iteration_limit_when_given(data, tmp_path):
    """RELION's --continue takes --o and --iter: the continued iterations go to the new root, at most that many in
    all, and the earlier run's files stay as they were (they were overwritten from iteration 2 on, --o and --iter
    silently ignored)."""
    import hashlib
    import subprocess

    _, ref = data
    before = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in ref.iterdir() if f.is_file()}
    new = tmp_path / "Refine3D" / "job002"
    new.mkdir(parents=True)
    cmd = _continue_cmd(new, ref / "run_it001_optimiser.star") + ["--o", str(new / "run"), "--iter", "2", "--pool", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (new / "run_it002_optimiser.star").is_file() and not list(new.glob("run_it003_*"))
    assert (new / "run_class001.mrc").is_file()  # iteration 2 of at most 2: the final one
    assert {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in ref.iterdir() if f.is_file()} == before


def test_continuing_in_place_before_a_finished_iteration_is_refused(data, tmp_path):
    """Continued in its own folder from iteration 1 of a run that finished 3, the run would overwrite iterations 2
    and 3: one line says so and names the fixes, and no file changes."""
    import hashlib
    import subprocess

    _, ref = data
    before = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in ref.iterdir() if f.is_file()}
    done = subprocess.run(_continue_cmd(ref, ref / "run_it001_optimiser.star"), capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "iteration 2 of this run has finished" in done.stderr and "--o" in done.stderr
    assert "run_it003_optimiser.star" in done.stderr
    assert {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in ref.iterdir() if f.is_file()} == before


def test_a_setting_the_continued_run_would_drop_is_refused(data, tmp_path):
    """--continue keeps the run's own settings: one given that differs (here --tau2_fudge and --healpix_order) would be
    silently dropped, so the command stops with one line naming them, before any iteration runs."""
    import subprocess

    _, ref = data
    cmd = _continue_cmd(tmp_path, ref / "run_it002_optimiser.star")
    cmd += ["--o", str(tmp_path / "run"), "--tau2_fudge", "3", "--healpix_order", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--healpix_order, --tau2_fudge: a continued run keeps the settings it was started with" in done.stderr
    assert not list(tmp_path.glob("run_it*"))
