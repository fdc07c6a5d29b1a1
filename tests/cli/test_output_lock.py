"""Two runs into one output prefix: while a refinement writes to out/run (paused in iteration 2 by
CRYOREFINE_TEST_PAUSE_AT, cryorefine.debug_hooks), a second refine, classify or --continue into it stops with exit 2
and one line naming out/run.lock, and the first run's files stay as they were; SIGTERM stops the first run and
releases the lock. A SIGKILLed run's lock stays behind and is replaced, with a warning, by the next run.

8 particles, box 16 (the bad-input project's size): a run is about 2 s plus the interpreter's start."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.simulate import simulate_particles

BOX, ANGPIX, N = 16, 4.0, 8
ARGS = ["--particle_diameter", "40", "--healpix_order", "1", "--offset_range", "2", "--offset_step", "1", "--j", "1"]


def argv(command="refine", *extra):
    return [command, "--i", "data/particles.star", "--ref", "data/truth.mrc", "--o", "out/run", *ARGS, *extra]


def cli(*args):
    return [sys.executable, "-m", "cryorefine.cli.main", *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lock_data")
    z, y, x = torch.meshgrid(*(torch.arange(BOX, dtype=torch.float32) - BOX // 2,) * 3, indexing="ij")
    simulate_particles(torch.exp(-((x - 1) ** 2 + y**2 + (z + 2) ** 2) / 8.0), ANGPIX, folder, n=N, snr=0)
    return folder


@pytest.fixture
def paused(data, tmp_path, monkeypatch):
    """A refine into out/run paused in iteration 2's E-step (iteration 1's files written), in the working folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data)
    marker = tmp_path / "paused"
    env = dict(os.environ, CRYOREFINE_TEST_PAUSE_AT="estep:2", CRYOREFINE_TEST_PAUSE_MARKER=str(marker))
    p = subprocess.Popen(
        cli(*argv("refine", "--iter", "2")), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()
    p.stderr.close()


def snapshot(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def in_process(args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    return rc, err.getvalue()


def test_second_run_into_a_running_prefix_is_refused(paused, tmp_path):
    out = tmp_path / "out"
    before = snapshot(out)
    assert "run.lock" in before and "run_it001_optimiser.star" in before
    r = subprocess.run(cli(*argv()), capture_output=True, text=True, timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 2, r.stderr
    assert line.startswith(f"cryorefine refine: error: out/run.lock: another cryorefine run (pid {paused.pid} on host ")
    assert "is writing to out/run;" in line and "--o" in line
    for args in (argv("classify", "--K", "2"), ["refine", "--continue", "out/run_it001_optimiser.star", "--j", "1"]):
        rc, err = in_process(args)
        assert rc == 2 and f"error: out/run.lock: another cryorefine run (pid {paused.pid}" in one_line(err), err
    assert snapshot(out) == before

    paused.send_signal(signal.SIGTERM)  # stopped as after Ctrl-C: the lock goes with it
    assert paused.wait(timeout=60) == 143
    assert "stopped by SIGTERM" in paused.stderr.read().decode().strip().splitlines()[-1]
    assert not (out / "run.lock").exists()


def test_lock_of_a_killed_run_is_replaced_by_the_next(paused, tmp_path):
    out = tmp_path / "out"
    paused.kill()
    paused.wait()
    assert (out / "run.lock").exists()
    r = subprocess.run(
        cli("refine", "--continue", "out/run_it001_optimiser.star", "--j", "1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    warning = f"warning: out/run.lock: replaced the stale lock of a run that is gone (pid {paused.pid} on host "
    assert [line for line in r.stderr.splitlines() if warning in line], r.stderr[-2000:]
    assert warning in (out / "run.log").read_text()
    assert (out / "run_class001.mrc").exists() and not (out / "run.lock").exists()
