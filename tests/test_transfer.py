"""Host copies for the file-writing thread (transfer.to_host): the same values as .cpu(), arrays passed through; on a
GPU through pinned memory on a side stream (whether the run's reads still wait for them is timed by paper_bench's
`plan` host time, not here)."""

import numpy as np
import pytest
import torch

from cryorefine.transfer import to_host


def test_host_copies_are_the_values():
    t = torch.randn(5, 6, dtype=torch.float64)
    a = np.arange(4.0)
    got = to_host([t, a])
    assert np.array_equal(got[0], t.numpy()) and got[0].dtype == np.float64
    assert np.array_equal(got[1], a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_copies_are_the_values():
    maps = [torch.randn(64, 64, 64, device="cuda") for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e8))  # the run's stream busy for a while (~50 ms)
    maps[1] = maps[1] * 2  # made on the run's stream after it: the copies must wait for it
    got = to_host(maps)
    assert all(np.array_equal(g, m.cpu().numpy()) for g, m in zip(got, maps))
