"""The GPU's libraries started in a thread beside a run's start-up (cuda_libraries.py)."""

import os
import subprocess
import sys

import pytest
import torch

from cryorefine import cuda_libraries


def test_the_thread_leaves_cufft_plans_for_the_runs_box(device):
    """On a GPU, cuFFT's plan cache holds the thread's plans when it ends (the run's transforms of that box find
    them); on the CPU the thread ends without error and nothing is left on any GPU."""
    if device.type == "cuda":
        torch.backends.cuda.cufft_plan_cache.clear()
    thread = cuda_libraries.start(str(device), 48)
    thread.join(60)
    assert not thread.is_alive()
    if device.type == "cuda":
        assert torch.backends.cuda.cufft_plan_cache.size >= 2  # the 2D pair at least


def test_expandable_segments_unless_the_environment_sets_the_allocator(device, monkeypatch):
    """On a GPU a run turns on the allocator's expandable segments, and a new block lies in an expandable segment;
    a user's PYTORCH_CUDA_ALLOC_CONF is left to rule. On the CPU there is no allocator to set."""
    for name in cuda_libraries.ALLOCATOR_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert not cuda_libraries.use_expandable_segments(device)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    if device.type == "cpu":
        assert not cuda_libraries.use_expandable_segments(device)
        return
    assert cuda_libraries.use_expandable_segments(device)
    block = torch.empty(torch.cuda.memory_reserved(device) + (64 << 20), dtype=torch.uint8, device=device)
    segments = [
        s for s in torch.cuda.memory_snapshot() if s["address"] <= block.data_ptr() < s["address"] + s["total_size"]
    ]
    assert segments and segments[0].get("is_expandable"), segments[:1]
    del block


def test_an_allocator_without_expandable_segments_is_left_as_it_is(monkeypatch):
    """A setter that refuses (an allocator with no such setting) leaves the run going with its allocator."""
    for name in cuda_libraries.ALLOCATOR_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def refusing(setting):
        calls.append(setting)
        raise RuntimeError("not supported")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refusing, raising=False)
    assert not cuda_libraries.use_expandable_segments("cuda")
    assert calls == ["expandable_segments:True"]


FRESH_PROCESS = """
import torch
from cryorefine.cuda_libraries import use_expandable_segments
assert not torch.cuda.is_initialized()
use_expandable_segments("cuda:0")
block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:0")
ends = [(s["address"], s["address"] + s["total_size"], s.get("is_expandable")) for s in torch.cuda.memory_snapshot()]
print([e for a, b, e in ends if a <= block.data_ptr() < b])
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expandable_segments_set_before_cuda_starts():
    """As in a `cryorefine` process: the setting made before CUDA has started holds for the first block."""
    env = {k: v for k, v in os.environ.items() if k not in cuda_libraries.ALLOCATOR_ENVIRONMENT}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[True]", done.stdout
