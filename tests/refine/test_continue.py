"""--continue after a run is killed with SIGKILL: it resumes from the last finished iteration, repeats the interrupted
iteration the same way, and no half-written file carries a final name."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_star
from cryorefine.mixture import state_maps
from cryorefine.simulate import simulate_particles

BOX, ANGPIX = 32, 6.0


def _cmd(d, out, *extra):
    return [sys.executable, "-m", "cryorefine.cli.main", "refine", "--i", str(d / "particles.star"), "--o", str(out / "run"), "--ref", str(d / "start.mrc"),
            "--ini_high", "30", "--particle_diameter", "170", "--ctf", "--flatten_solvent", "--zero_mask", "--healpix_order", "1",
            "--offset_range", "2", "--offset_step", "1", "--iter", "3", "--random_seed", "3", "--j", "1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cont")
    simulate_particles(state_maps(BOX, ANGPIX, 100.0)[0], ANGPIX, d, 60, snr=0.5, seed=5, max_shift_angst=3.0)
    t, _ = read_map(d / "truth.mrc")
    write_map(d / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX)
    ref = d / "straight"
    subprocess.run(_cmd(d, ref), check=True, capture_output=True)
    return d, ref


def test_killed_run_continues_and_repeats_the_iteration(data):
    d, ref = data
    out = d / "killed"
    p = subprocess.Popen(_cmd(d, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "run_it001_optimiser.star").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside iteration 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "run_class001.mrc").exists()
    # every file with a final name is complete (temporaries start with a dot)
    for f in out.iterdir():
        if f.name.endswith(".star") and not f.name.startswith("."):
            read_star(f)
    last = sorted(out.glob("run_it*_optimiser.star"))[-1]
    r = subprocess.run(_cmd(d, out, "--continue", str(last))[:4] + ["--continue", str(last), "--j", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ["run_class001.mrc", "run_data.star", "run_model.star", "run_half1_class001_unfil.mrc"]:
        assert (out / name).exists()
    a = read_star(ref / "run_it002_data.star")["particles"]
    b = read_star(out / "run_it002_data.star")["particles"]
    for col in ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"]:
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), atol=1e-3)
    ma, _ = read_map(ref / "run_class001.mrc")
    mb, _ = read_map(out / "run_class001.mrc")
    assert np.corrcoef(ma.ravel(), mb.ravel())[0, 1] > 0.999


def test_continue_from_missing_file_is_a_clear_error(tmp_path, capsys):
    from cryorefine.cli.main import main

    rc = main(["refine", "--continue", str(tmp_path / "run_it003_optimiser.star"), "--o", str(tmp_path / "run")])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run_it003_optimiser.star" in err[0]
