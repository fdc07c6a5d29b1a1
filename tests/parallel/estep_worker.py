"""One auto-refine E-step from the start state, combined over ranks; rank 0 saves the accumulators and poses.

usage: torchrun --standalone --nproc_per_node N estep_worker.py OUT.pt REFINE_FLAGS...
       (tests/parallel/test_distributed.py)
"""

import sys

import torch

from cryorefine.cli.main import build_parser
from cryorefine.cli.refine import config_from_args
from cryorefine.parallel.context import Dist, distributed
import time

from cryorefine.refine.auto_refine import ESTEP_VOLUMES, AutoRefineMode, load_or_start
from cryorefine.refine.config import RefineConfig
from cryorefine.refine.context import open_run
from cryorefine.refine.loop import run_estep


def one_estep(refine_flags: list[str], dist: Dist | None = None) -> dict:
    """sums: each half's accumulators (WeightedSums.tensors()); poses: ParticlePoses arrays; batches: per rank."""
    cfg = config_from_args(build_parser().parse_args(["refine", *refine_flags]), RefineConfig)
    mode = AutoRefineMode()
    ctx = open_run(cfg, dist, ESTEP_VOLUMES)
    plan, state = mode.plan(ctx, load_or_start(mode, ctx))
    estep, poses, ranks = run_estep(mode, ctx, state, plan, time.perf_counter())
    return {
        "sums": [[t.clone() for t in s.tensors()] for s in estep.sums],
        "poses": poses.as_dict(),
        "batches": ranks["batches_per_rank"],
        "estep_s": ranks["estep_s_per_rank"],
    }


if __name__ == "__main__":
    with distributed("cpu", 120.0) as dist:
        result = one_estep(sys.argv[2:], dist)
        if dist.is_main:
            torch.save(result, sys.argv[1])
