"""Initial noise spectra read in shares: processes that each read every ranks-th batch and sum their partial sums give
the one-process σ², each image read once (three threads stand in for three ranks, a barrier for the all-reduce)."""

import threading

import numpy as np
import torch

from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.mstep.noise import SpectrumReads, initial_sigma2
from small_set import small_set


def test_three_shares_summed_give_the_one_process_sigma2(tmp_path):
    d = small_set(tmp_path, 24, 6.0, 50, seed=5)
    table = load_particles(d / "particles.star")
    halves = np.arange(len(table)) % 2
    one = initial_sigma2(table, 1, halves, batch=8, mask_radius_angst=60.0)

    ranks, deposits, reads = 3, {}, []
    barrier, lock = threading.Barrier(ranks), threading.Lock()

    def combine(rank, tensors):
        deposits[rank] = [t.clone() for t in tensors]
        barrier.wait()  # every rank's partial sums are in
        for i, t in enumerate(tensors):
            t.copy_(sum(deposits[r][i] for r in range(ranks)))
        barrier.wait()  # every rank has summed before the next deposit

    def read(rows):
        with lock:
            reads.extend(rows.tolist())
        return torch.from_numpy(read_images(table, rows))

    results = {}

    def rank_run(rank):
        share = SpectrumReads(read, None, rank, ranks, lambda tensors: combine(rank, tensors))
        results[rank] = initial_sigma2(table, 1, halves, batch=8, mask_radius_angst=60.0, reads=share)

    threads = [threading.Thread(target=rank_run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reads) == list(range(len(table)))  # each image once, over all ranks (7 batches of 8 on 3 ranks)
    for r in range(ranks):
        torch.testing.assert_close(results[r], one, rtol=1e-12, atol=0.0)
