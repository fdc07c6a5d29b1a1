"""The coarse-pass FLOP counter of the benchmarks against PyTorch's own count of the matrix products.

torch.utils.flop_counter.FlopCounterMode counts 2·M·K·N for every mm/bmm/einsum it sees; around the coarse pass it
must agree with ``coarse_gemm_flops`` (global and local searches) up to the small products of the projections
(rotating the Fourier grid), and the StageTimer of an E-step must receive the same number with its shapes.
"""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cryorefine.estep.diff2 import coarse_gemm_flops, coarse_scores
from cryorefine.estep.expectation import expectation_batch
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.images import Window, prepare_batch
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.sums import WeightedSums
from cryorefine.geometry.healpix import make_sampling
from cryorefine.io.particles import load_particles
from cryorefine.projection.extract import extract_central_slices, prepare_padded_transform
from cryorefine.refine.timing import StageTimer
from cryorefine.simulate import simulate_particles

BOX, ANGPIX, N, JSHELL, CSHELL = 24, 3.0, 5, 10, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("flops")
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(BOX, BOX, BOX, generator=g, dtype=torch.float64)
    simulate_particles(vol.float(), ANGPIX, d, N, snr=0.5, seed=2, max_shift_angst=3.0)
    table = load_particles(d / "particles.star")
    window = Window.build(BOX, JSHELL)
    sigma2 = torch.full((1, BOX // 2 + 1), BOX * BOX / 2.0, dtype=torch.float64)
    batch = prepare_batch(
        table,
        np.arange(N),
        window,
        sigma2,
        torch.tensor([1.0]),
        60.0,
        ANGPIX,
        True,
        True,
        torch.Generator().manual_seed(1),
        None,
    )
    grid = PoseGrid.build(make_sampling(1, "C1", 0.0), 2.0, 1.0)
    refs = [prepare_padded_transform(vol.float(), 2), prepare_padded_transform(vol.flip(0).float(), 2)]
    return table, window, batch, grid, refs


def _counted(fn):
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


@pytest.mark.parametrize("local", [False, True])
def test_coarse_flops_match_pytorch_count(setup, local):
    table, window, batch, grid, refs = setup
    jc = window.prefix(CSHELL)
    loc = grid.local_candidates(table.rot_deg, table.tilt_deg, table.psi_deg, 20.0) if local else None
    # local: the gathered PyTorch products, which tf32 takes on the CPU too (fp32's compiled loop is not counted)
    precision = "tf32" if local else "fp32"
    torch_flops, d2 = _counted(lambda: coarse_scores(batch, window, jc, refs, grid, loc, precision=precision))
    n, K, T, L = d2.shape
    ours, shapes = coarse_gemm_flops(n, K, T, L, jc, local)
    assert ours > 0 and len(shapes) == 2
    # besides the GEMMs, the coarse pass only rotates the Fourier grid of each projection (a small einsum on a GPU;
    # none that PyTorch counts on the CPU, where a compiled loop interpolates)
    rot = grid.rotations(torch.unique(loc[0])) if local else grid.coarse_rotations
    proj_flops = sum(
        _counted(lambda r=r: extract_central_slices(r, rot, window.ky[:jc], window.kx[:jc]))[0] for r in refs
    )
    assert 0 <= proj_flops < ours
    assert torch_flops == ours + proj_flops, (ours, proj_flops, torch_flops)


def test_timer_gets_the_coarse_flops(setup):
    _, window, batch, grid, refs = setup
    timer = StageTimer()
    sums = WeightedSums.zeros(2, BOX, 2, 1, grid.sampling.n_directions)
    expectation_batch(
        batch, window, CSHELL, refs, grid, EStepSettings(angpix=ANGPIX, sigma2_offset_angst2=30.0), sums, timer=timer
    )
    c = timer.reset_counters()
    jc = window.prefix(CSHELL)
    expect, shapes = coarse_gemm_flops(N, 2, grid.n_translations, grid.n_rotations, jc, False)
    assert c["coarse"]["flops"] == expect
    assert c["coarse"]["shapes"] == {k: v for k, v in shapes}
    assert c["coarse"]["seconds"] > 0 and c["fine"]["flops"] > 0 and c["store"]["flops"] > 0
    assert set(timer.seconds) >= {"getAllSquaredDifferences", "convertAllDiff2ToWeights", "storeWeightedSums"}
    assert timer.reset_counters() == {}


def test_fine_and_store_flops_match_pytorch_count(setup):
    """The fine pass's and storeWeightedSums' counted products (the reports' per-stage rates) against PyTorch's count
    of every batched product of one E-step; the only other one is the posterior's angular spread (an einsum of 3×3
    rotations per slot: a fraction of a percent here)."""
    _, window, batch, grid, refs = setup
    timer = StageTimer()
    sums = WeightedSums.zeros(2, BOX, 2, 1, grid.sampling.n_directions)
    settings = EStepSettings(angpix=ANGPIX, sigma2_offset_angst2=30.0)
    torch_flops, _ = _counted(lambda: expectation_batch(batch, window, CSHELL, refs, grid, settings, sums, timer=timer))
    c = timer.reset_counters()
    fine_store = c["fine"]["flops"] + c["store"]["flops"]
    bmm = torch_flops - c["coarse"]["flops"]  # the coarse pass's products: test_timer_gets_the_coarse_flops
    assert 0 <= bmm - fine_store < 0.01 * fine_store, (bmm, c["fine"]["flops"], c["store"]["flops"])
