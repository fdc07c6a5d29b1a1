"""bench/estep_dispatch.py's counter, and the E-step's device reads per batch: the same with 1 or 4 classes (the fine
pass's projections and the back-projection take each class's rotations as runs of one read, not a mask and a test
per class), and few."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cryorefine.estep import weights
from cryorefine.estep.expectation import expectation_batch
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.sums import WeightedSums
from cryorefine.geometry.healpix import make_sampling
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.refine.engine import results_on_host

REPO = Path(__file__).resolve().parents[2]
BOX, ANGPIX, N = 24, 3.0, 6


def _bench():
    spec = importlib.util.spec_from_file_location("estep_dispatch", REPO / "bench" / "estep_dispatch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    import sys

    sys.path.insert(0, str(REPO / "tests" / "estep"))
    from simulated_batch import simulated_batch

    truth, window, batch = simulated_batch(tmp_path_factory.mktemp("reads"), BOX, ANGPIX, N, 10, 0.5, 3, 3.0)
    return truth, window, batch


def _reads(batch, K: int) -> tuple[int, int]:
    truth, window, b = batch
    g = torch.Generator().manual_seed(K)
    noise = [0.01 * k * torch.randn(truth.shape, generator=g, dtype=truth.dtype) for k in range(K)]
    refs = [prepare_padded_transform((truth + e).float(), 2) for e in noise]
    grid = PoseGrid.build(make_sampling(1, "C1", 0.0), 2.0, 1.0)
    sums = WeightedSums.zeros(K, BOX, 2, 1, grid.sampling.n_directions)
    counter = _bench().DispatchCounter()
    with counter:
        counter.on = True
        res = expectation_batch(b, window, 6, refs, grid, EStepSettings(angpix=ANGPIX), sums)
        results_on_host(res, res.residual_power)
    assert res.class_index.max() < K and np.all(np.isfinite(grid.best_eulers_deg(res.fine_pose.numpy())))
    return counter.reads, counter.calls


def test_device_reads_per_batch_do_not_grow_with_the_classes(batch, monkeypatch):
    reads1, calls1 = _reads(batch, 1)
    reads4, calls4 = _reads(batch, 4)
    # the significant sets (the coarse one with its total, 4 fine groups'), the fine slots' sizes, the class runs of
    # the back-projection and the results with the best samples; 28 with K = 1 and 49 with K = 4 before 63454bf
    # (results column by column, class masks), 14 before the fine slots' sizes came in one read, 9 before the best
    # samples came with the results. A set whose mass lies beyond the top-k samples takes one more (its total after
    # the full sort): data, not classes
    assert reads1 <= 8 and reads4 <= 9, (reads1, reads4)
    assert 0 < calls1 < calls4
    monkeypatch.setattr(weights, "TOPK_SIGNIFICANT", 1 << 30)  # every set by a full sort: the same path for both
    assert _reads(batch, 1)[0] == _reads(batch, 4)[0] == 4


def test_a_boolean_mask_and_a_scalar_are_reads_and_plain_indexing_is_not():
    bench = _bench()
    x = torch.arange(6.0)
    counter = bench.DispatchCounter()
    with counter:
        counter.on = True
        _ = x[x > 2]  # a mask: its size is on the device
        _ = int(x.sum())
        _ = x[torch.tensor([0, 1])]
        _ = x.repeat_interleave(2)
    assert counter.reads == 2 and counter.calls >= 6
