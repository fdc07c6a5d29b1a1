"""The GPU's libraries started in a thread beside a run's start-up (cuda_libraries.py)."""

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
