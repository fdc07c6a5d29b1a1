"""run.log's host-only times: planning and the wait for the last iteration's files, the gaps in which the GPU has
nothing queued (refine/timing.StageTimer.host), are measured where they happen; the process's start-up (to its first
E-step batch) is told in its first iteration."""

import re
import sys
import threading
import time

import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.io.background import BackgroundWriter
from cryorefine import validate as validation
from cryorefine.refine import classify3d
from cryorefine.thread_switches import SWITCH_INTERVAL_S
from small_set import small_run_flags, small_set

SLOW_FILES_S = 0.5


def test_the_wait_for_slow_files_is_in_the_next_iteration(tmp_path, monkeypatch):
    d = small_set(tmp_path / "data", 40, 4.8, 60, seed=3)
    write_files, submit = classify3d.ClassifyMode.write_files, BackgroundWriter.submit
    second_submit, submits = threading.Event(), []

    def counted_submit(self, fn, *args, **kwargs):
        submits.append(fn)
        if len(submits) == 2:
            second_submit.set()
        return submit(self, fn, *args, **kwargs)

    def slow(self, ctx, state, info):
        if state.iteration == 1:  # a slow disk: iteration 2 is computed meanwhile, and its submit waits
            assert second_submit.wait(120)
            time.sleep(SLOW_FILES_S)
        return write_files(self, ctx, state, info)

    monkeypatch.setattr(BackgroundWriter, "submit", counted_submit)
    monkeypatch.setattr(classify3d.ClassifyMode, "write_files", slow)
    argv = ["classify", *small_run_flags(d, tmp_path / "out"), "--K", "2", "--iter", "3", "--random_seed", "1"]
    assert main(argv) == 0
    lines = [x for x in (tmp_path / "out" / "run.log").read_text().splitlines() if re.search(r"\] iter +\d", x)]
    assert len(lines) == 3, lines
    plans = [float(m) for x in lines for m in re.findall(r"\bplan ([\d.]+)s", x)]
    assert len(plans) == 3, lines
    waits = [float(m) for x in lines for m in re.findall(r"waiting for files ([\d.]+)s", x)]
    # counted in the next iteration: after iteration 1 nothing was in flight; after iteration 2 iteration 1's files
    # were, for SLOW_FILES_S at least
    assert len(waits) == 2 and waits[0] < 0.05 and waits[1] >= SLOW_FILES_S - 0.05, lines
    # the process's start-up is told once, in its first iteration
    assert ["first batch" in x for x in lines] == [True, False, False], lines


def test_seconds_since_process_start_against_the_parents_clock():
    """A child process that sleeps 1 s before asking: at least that, at most the parent's wall time from before the
    child was started to its answer."""
    import subprocess
    import sys

    code = "import time; time.sleep(1.0); from cryorefine.refine.timing import seconds_since_process_start as s; "
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code + "print(s())"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    told = float(out.stdout)
    assert 1.0 <= told <= wall + 0.02, (told, wall)  # /proc's times are in 10 ms ticks


def test_threads_hand_over_promptly_while_a_run_writes(tmp_path, monkeypatch):
    """While the run's thread and its other threads (files; Triton's cache key from the start) share the interpreter
    lock, it changes hands within SWITCH_INTERVAL_S, from the validation of the inputs to the last file; the caller's
    interval is back after."""
    d = small_set(tmp_path / "data", 40, 4.8, 60, seed=3)
    write_files, seen = classify3d.ClassifyMode.write_files, []
    validate = validation.validate_refine_inputs

    def validating(args):
        seen.append(sys.getswitchinterval())
        return validate(args)

    monkeypatch.setattr(validation, "validate_refine_inputs", validating)

    def noting(self, ctx, state, info):
        if state.iteration == 2:  # the last iteration's files, written while the run ends
            time.sleep(0.3)
        seen.append(sys.getswitchinterval())
        return write_files(self, ctx, state, info)

    monkeypatch.setattr(classify3d.ClassifyMode, "write_files", noting)
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.01)
    try:
        argv = ["classify", *small_run_flags(d, tmp_path / "out"), "--K", "2", "--iter", "2", "--random_seed", "1"]
        assert main(argv) == 0
        assert sys.getswitchinterval() == pytest.approx(0.01)
    finally:
        sys.setswitchinterval(before)
    assert len(seen) == 3 and all(s == pytest.approx(SWITCH_INTERVAL_S) for s in seen), seen


def test_the_allocator_events_are_those_of_the_iteration(device):
    """A block larger than any the allocator holds makes it call cudaMalloc once; the same size again comes from its
    cache, and nothing is told. On the CPU there is no allocator to ask."""
    from cryorefine.refine.timing import StageTimer

    timer = StageTimer(device)
    timer.reset_allocator()
    if device.type == "cpu":
        assert timer.reset_allocator() == {}
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    timer.reset_allocator()
    big = torch.empty(torch.cuda.memory_reserved(device) + 2**30, dtype=torch.uint8, device=device)
    assert timer.reset_allocator().get("cudaMalloc", 0) >= 1
    del big
    again = torch.empty(2**30, dtype=torch.uint8, device=device)
    assert "cudaMalloc" not in timer.reset_allocator()
    del again
