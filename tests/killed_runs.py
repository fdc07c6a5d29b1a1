"""Kill tests' tools: stop a run with SIGKILL at a named point (cryorefine.debug_hooks' CRYOREFINE_TEST_PAUSE_AT) and
check what it left under final names."""

import os
import subprocess
import time

import torch

from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_star
from small_set import small_set


def kill_at(cmd, stage_key, marker, timeout=300):
    """Start `cmd` paused at `stage_key`, wait for it to get there, SIGKILL it."""
    env = dict(os.environ, CRYOREFINE_TEST_PAUSE_AT=stage_key, CRYOREFINE_TEST_PAUSE_MARKER=str(marker))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not marker.exists():
        assert p.poll() is None, f"the run ended before reaching {stage_key}: {p.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, f"{stage_key} not reached in {timeout} s"
        time.sleep(0.05)
    p.kill()
    p.wait()
    p.stderr.close()


def final_names(folder):
    """Files under their final names (temporaries start with a dot)."""
    return {f.name for f in folder.iterdir() if not f.name.startswith(".")}


def assert_every_output_parses(folder, box: int):
    for name in final_names(folder):
        path = folder / name
        if name.endswith(".star"):
            assert read_star(path), name
        elif name.endswith(".mrc"):
            assert read_map(path)[0].shape == (box,) * 3, name
        elif name.endswith(".pt"):
            assert torch.load(path, weights_only=False)["iteration"] >= 1, name
        else:
            assert path.stat().st_size > 0, name


def kill_then_continue(
    cmd, continue_cmd, pause_at: str, out, ref, box: int, marker, absent: str, in_writing=None
) -> None:
    """Kill ``cmd`` (writing into folder ``out``) at ``pause_at`` in iteration 2 and check what it left: iteration 1's
    optimiser.star the last, no file ``absent`` of a later stage, every file under a final name whole, and with
    ``in_writing`` = (a temporary's glob, a file written before it) the kill between writing and renaming. Then
    ``continue_cmd`` must finish with the uninterrupted run's (``ref``) file names, no temporaries left and every
    output whole."""
    kill_at(cmd, pause_at, marker)
    assert sorted(f.name for f in out.glob("run_it*_optimiser.star")) == ["run_it001_optimiser.star"]
    assert not (out / absent).exists()
    assert_every_output_parses(out, box)
    if in_writing is not None:
        assert list(out.glob(in_writing[0])), "the kill should land between writing and renaming"
        assert (out / in_writing[1]).exists()
    r = subprocess.run(continue_cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert final_names(out) == final_names(ref)
    assert not list(out.glob(".*.tmp*")), "temporaries of the killed run are removed"
    assert_every_output_parses(out, box)


def set_and_uninterrupted_run(tmp_path_factory, name: str, seed: int, box: int, angpix: float, cmd):
    """A small simulated set (tests/small_set.py, 60 particles) and the run ``cmd(set, out)`` done without a kill into
    set/straight, what the killed runs are compared with: (set folder, the run's folder)."""
    d = small_set(tmp_path_factory.mktemp(name), box, angpix, 60, seed=seed)
    subprocess.run(cmd(d, d / "straight"), check=True, capture_output=True)
    return d, d / "straight"
