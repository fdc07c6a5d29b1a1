"""The pure parts of the torchrun support: device per rank, backend choice, the pool and collectives in one process."""

import numpy as np
import pytest
import torch

from cryorefine.errors import CryoInputError, DistributedError
from cryorefine.parallel.collectives import all_reduce_sum_, guarded, merge_rows_, per_rank
from cryorefine.parallel.context import Dist, choose_backend, rank_device
from cryorefine.parallel.pool import TaskPool


def test_rank_device():
    assert rank_device(None, 3, 0) == "cpu"
    assert rank_device("", 0, 4) == "cuda:0"
    assert rank_device("", 5, 4) == "cuda:1"  # bare --gpu: LOCAL_RANK, wrapped on the visible GPUs
    assert rank_device("0", 2, 4) == "cuda:0"  # one id: every rank on it
    assert rank_device("2,3", 1, 4) == "cuda:3"
    with pytest.raises(CryoInputError, match="no CUDA"):
        rank_device("", 0, 0)


def test_choose_backend():
    assert choose_backend(["a/cuda:0", "a/cuda:1", "b/cuda:0"]) == "nccl"
    assert choose_backend(["a/cuda:0", "a/cuda:0"]) == "gloo"  # NCCL cannot put two ranks on one GPU
    assert choose_backend(["a/cpu", "a/cpu"]) == "gloo"
    assert choose_backend(["a/cuda:0", "b/cpu"]) == "gloo"


def test_one_process_pool_hands_out_every_batch_once():
    pool = TaskPool(Dist())
    assert list(pool.take("it1/half1", 5)) == [0, 1, 2, 3, 4]
    assert list(pool.take("it1/half2", 2)) == [0, 1]
    assert list(pool.take("it1/half1", 5)) == []  # a key is one pass
    assert pool.taken_since_last_call() == 7 and pool.taken_since_last_call() == 0


def test_one_process_collectives_leave_data_alone():
    dist = Dist()
    t = torch.arange(3.0)
    all_reduce_sum_([t], dist)
    a = np.arange(4.0)
    merge_rows_([a], np.array([0, 1]), dist)
    np.testing.assert_array_equal(t.numpy(), [0, 1, 2])
    np.testing.assert_array_equal(a, [0, 1, 2, 3])
    assert per_rank([5, 0.5], dist) == [[5.0, 0.5]]


def test_failed_collective_is_one_line_naming_the_rank():
    with pytest.raises(DistributedError) as e:
        with guarded(Dist(rank=2, timeout_s=30), "summing the accumulators"):
            raise RuntimeError("Connection closed by peer [10.0.0.2]:1234\n  more detail")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rank 2: summing the accumulators failed") and "30 s" in msg
