"""--batch 0 (automatic): one process keeps 4096 (GPU) / 256 (CPU); several ranks get about 8 batches each per
iteration."""

from types import SimpleNamespace

import pytest
import torch

from cryorefine.parallel.context import Dist
from cryorefine.refine.config import RefineConfig, auto_batch_size
from cryorefine.refine.context import RunContext

BETAGAL = 8915


def batches_per_iteration(n: int, batch: int) -> int:
    """Both half sets, each cut into batches of its own (as auto-refine's E-step does)."""
    half = -(-n // 2)
    return 2 * -(-half // batch)


def test_one_process_is_unchanged():
    for n in (40, BETAGAL, 35645, 10**6):
        assert auto_batch_size(n, 1, True) == 4096
        assert auto_batch_size(n, 1, False) == 256


@pytest.mark.parametrize("world", [2, 4, 8])
def test_several_ranks_get_eight_batches_each(world):
    b = auto_batch_size(BETAGAL, world, True)
    assert b % 32 == 0 and 64 <= b < 4096
    assert batches_per_iteration(BETAGAL, b) >= 8 * world
    assert {2: 544, 4: 256, 8: 128}[world] == b


def test_bounds():
    assert auto_batch_size(40, 2, True) == 64  # at least 64
    assert auto_batch_size(10**6, 2, True) == 4096  # never above the one-process size
    assert auto_batch_size(35645, 2, True) == 2208  # 2,228 a rank, down to a multiple of 32
    assert auto_batch_size(35645, 4, True) == 1088
    assert auto_batch_size(35645, 8, True) == 544
    assert auto_batch_size(BETAGAL, 2, False) == 256  # CPU: capped by its 256
    assert auto_batch_size(1000, 2, False) == 64  # 63 -> 32 -> at least 64


def test_engine_uses_the_rule_unless_batch_is_given():
    def batch_size(batch, world, dev, memory_batch=0):
        cfg = RefineConfig(particles="", output_root="", reference="", batch_size=batch)
        ctx = SimpleNamespace(cfg=cfg, table=range(BETAGAL), dist=Dist(world_size=world), device=torch.device(dev),
                              memory_batch=memory_batch)  # fmt: skip
        return RunContext.batch_size.fget(ctx)

    assert batch_size(0, 1, "cuda") == 4096
    assert batch_size(0, 2, "cuda") == 544
    assert batch_size(0, 2, "cpu") == 256
    assert batch_size(300, 4, "cuda") == 300
    # a GPU whose memory fits fewer images per batch (estep/memory.batch_fitting), unless --batch says otherwise
    assert batch_size(0, 1, "cuda", memory_batch=128) == 128
    assert batch_size(0, 2, "cuda", memory_batch=1024) == 544
    assert batch_size(300, 1, "cuda", memory_batch=128) == 300
