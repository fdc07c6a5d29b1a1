"""torchrun jobs on the CPU (gloo) against one process, the independent reference.

96 particles, box 24 at 8 Å/px, healpix order 1, batches of 8 (12 per iteration). No --zero_mask: the background
noise of the masked images is random, so an E-step whose noise followed the order of the batches on a rank would
differ between 1, 2 and 3 ranks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_star
from small_set import small_run_flags, small_set

BOX, ANGPIX, N, BATCH = 24, 8.0, 96, 8
N_BATCHES = 2 * -(-N // 2 // BATCH)  # per iteration, both halves
WORKER = Path(__file__).with_name("estep_worker.py")


def flags(d: Path, out: Path, *extra) -> list[str]:
    return [
        *small_run_flags(d, out),
        "--iter",
        "2",
        "--random_seed",
        "3",
        "--j",
        "1",
        "--batch",
        str(BATCH),
        *extra,
    ]


def torchrun(n: int, *args) -> list[str]:
    """A torchrun command line with n CPU ranks; args: a script path or cryorefine's subcommand and flags."""
    target = [str(args[0]), *args[1:]] if str(args[0]).endswith(".py") else ["-m", "cryorefine.cli.main", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *target]


def run(cmd) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def particles(out: Path, name: str = "run_data.star"):
    return read_star(out / name)["particles"]


def same_pose_fraction(a, b) -> float:
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    return float(np.mean(np.all([np.isclose(a[c].to_numpy(), b[c].to_numpy(), atol=1e-3) for c in cols], axis=0)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_set(tmp_path_factory.mktemp("dist"), BOX, ANGPIX, N, seed=5)


@pytest.fixture(scope="module")
def reference(data):
    """The same refinement in this process, without torchrun."""
    out = data / "single"
    assert main(["refine", *flags(data, out)]) == 0
    return out


@pytest.fixture(scope="module")
def one_rank_estep(data):
    from estep_worker import one_estep

    return one_estep(flags(data, data / "estep1"))


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_estep_accumulators_match_one_process(data, one_rank_estep, n_ranks):
    out = data / f"estep{n_ranks}.pt"
    run(torchrun(n_ranks, WORKER, out, *flags(data, data / f"estep{n_ranks}")))
    got = torch.load(out, weights_only=False)
    print("batches per rank", got["batches"])
    assert len(got["batches"]) == n_ranks and sum(got["batches"]) == N_BATCHES
    assert len(got["estep_s"]) == n_ranks and all(s > 0 for s in got["estep_s"])
    for half_ref, half_got in zip(one_rank_estep["sums"], got["sums"]):
        for ref, t in zip(half_ref, half_got):
            # float32 back-projections summed in another order: relative to the largest entry
            torch.testing.assert_close(t, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-12)
    for name, ref in one_rank_estep["poses"].items():
        np.testing.assert_allclose(got["poses"][name], ref, rtol=1e-6, atol=1e-6, err_msg=name)


def test_refine_on_three_ranks_matches_one_process(data, reference):
    out = data / "three"
    r = run(torchrun(3, "refine", *flags(data, out)))
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone prints, logs and writes
    log = (out / "run.log").read_text()
    assert log.count("finished:") == 1 and "3 ranks (gloo)" in log and "batches/rank" in log

    def shell(o):
        res = float(read_star(o / "run_model.star")["model_general"]["rlnCurrentResolution"].iloc[0])
        return BOX * ANGPIX / res

    assert abs(shell(out) - shell(reference)) <= 1.0, (shell(out), shell(reference))
    assert same_pose_fraction(particles(out), particles(reference)) > 0.95
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]


def test_classify_on_two_ranks_matches_one_process(data):
    """One iteration (K references, class priors and accumulators over ranks); later ones share the same code path."""
    assert main(["classify", *flags(data, data / "c1", "--K", "2", "--iter", "1")]) == 0
    run(torchrun(2, "classify", *flags(data, data / "c2", "--K", "2", "--iter", "1")))
    assert (
        same_pose_fraction(particles(data / "c1", "run_it001_data.star"), particles(data / "c2", "run_it001_data.star"))
        > 0.95
    )
    a, b = (
        read_star(data / c / "run_it001_model.star")["model_classes"]["rlnClassDistribution"].to_numpy()
        for c in ("c1", "c2")
    )
    np.testing.assert_allclose(b, a, atol=1e-4)


def test_max_seconds_stops_every_rank_after_the_same_iteration(data):
    """--max_seconds under torchrun: rank 0 decides and tells the others, so the job stops cleanly (no rank left
    waiting for a collective) after iteration 1, which is complete and resumable."""
    out = data / "timed"
    r = run(
        torchrun(2, "refine", *flags(data, out, "--max_seconds", "0.01", "--dist_timeout", "60"))
    )  # shorter than any iteration
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["stopped"] and summaries[0]["iterations"] == 1, r.stdout
    assert summaries[0]["continue_from"] == f"{out / 'run'}_it001_optimiser.star"
    assert (out / "run_it001_optimiser.star").exists() and not (out / "run_it002_optimiser.star").exists()
    log = (out / "run.log").read_text()
    assert "stopping after iteration 1" in log and "finished:" not in log
    record = torch.load(out / "run_it001_state.pt", weights_only=False)["history"][0]
    assert sum(record["batches_per_rank"]) == N_BATCHES and "counters" in record


def test_output_lock_held_elsewhere_stops_every_rank_with_one_line(data):
    """Rank 0 alone takes out/run.lock and tells the others: a live holder (this test) stops every rank at once with
    the refusal's line and exit code 2 (no rank left waiting, none aborting), and nothing is written."""
    from cryorefine.io.run_lock import RunLock

    out = data / "locked"
    out.mkdir()
    with RunLock(out / "run.lock"):
        r = subprocess.run(torchrun(2, "refine", *flags(data, out)), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("cryorefine refine: error:")]
    assert len(ours) == 2 and all(f"{out / 'run.lock'}: another cryorefine run (pid {os.getpid()}" in x for x in ours)
    # torchrun reports the rank that exits first; the other may be stopped by its SIGTERM before it exits by itself
    assert r.stderr.count("exitcode  : 2 ") >= 1 and "SIGABRT" not in r.stderr, r.stderr[-3000:]
    assert not list(out.iterdir())


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher)."""
    children = " ".join(Path(t, "children").read_text() for t in Path(f"/proc/{launcher_pid}/task").iterdir()).split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {children}")


@pytest.fixture(scope="module")
def killed(data):
    """2 ranks, rank 1 sleeping 1 s after each batch; rank 1 SIGKILLed once iteration 1 is written.

    Returns the output folder, the launcher's exit code and stderr, and the seconds from the kill to its exit.
    """
    out = data / "killed"
    env = {**os.environ, "CRYOREFINE_SLOW_RANK": "1:1"}
    p = subprocess.Popen(
        torchrun(2, "refine", *flags(data, out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    log = out / "run.log"
    while not (log.exists() and "iter   1:" in log.read_text()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    # iteration 1 is logged and iteration 2 has begun; it cannot be finished yet (rank 1 sleeps 1 s after a batch),
    # while iteration 1's files are still being written in the background: the error must name them once complete
    os.kill(_rank_pid(p.pid, 1), signal.SIGKILL)
    t0 = time.time()
    _, err = p.communicate(timeout=120)
    return out, p.returncode, err, time.time() - t0


def test_killed_rank_stops_the_job_and_continue_resumes(killed, reference):
    out, returncode, err, stopped_after = killed
    print(f"stopped {stopped_after:.1f} s after the kill")
    assert returncode != 0 and stopped_after < 60
    ours = [line for line in err.splitlines() if line.startswith("cryorefine refine: error:")]
    assert len(ours) == 1, err[-3000:]
    assert "another rank" in ours[0] and f"--continue {out / 'run_it001_optimiser.star'}" in ours[0], ours[0]
    assert not (out / "run_class001.mrc").exists()

    run(torchrun(2, "refine", "--continue", str(out / "run_it001_optimiser.star"), "--j", "1"))
    assert same_pose_fraction(particles(out), particles(reference)) > 0.95
    a, b = read_map(out / "run_class001.mrc")[0], read_map(reference / "run_class001.mrc")[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_slow_rank_takes_fewer_batches(killed):
    out = killed[0]
    counts = torch.load(out / "run_it001_state.pt", weights_only=False)["history"][0]["batches_per_rank"]
    print("iteration 1, batches per rank (rank 1 sleeps 1 s after each batch):", counts)
    assert sum(counts) == N_BATCHES and counts[1] < counts[0]
    assert f"batches/rank {counts[0]}/{counts[1]}" in (out / "run.log").read_text()
