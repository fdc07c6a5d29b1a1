"""The E-step on windowed grids (references and back-projectors holding only the cube the window reaches, as RELION
sizes its projectors by the current image size) against the whole padded grids: the same poses and sums."""

from __future__ import annotations

import torch

from cryorefine.estep.expectation import expectation_batch
from cryorefine.estep.stages import NO_STAGES
from cryorefine.estep.sums import WeightedSums
from cryorefine.projection.extract import PaddedTransform, window_grid_size
from test_memory import make_case


def test_estep_on_windowed_grids_equals_the_whole_grids(tmp_path):
    box = 32
    c = make_case(tmp_path, box=box, n=16)
    window = c["window"]
    radius = float(torch.sqrt(window.kx**2 + window.ky**2).max())
    size = window_grid_size(radius, box, 2)
    full, mid, h = c["ref"], box, size // 2  # the whole grid's centre index is P/2 = box
    assert size < 2 * box
    cube = (slice(mid - h, mid + h), slice(mid - h, mid + h), slice(0, h + 1))
    windowed = PaddedTransform(full.f_padded[cube].contiguous(), full.box, full.pad)
    out = []
    for ref, grid in ((full, None), (windowed, size)):
        sums = WeightedSums.zeros(1, box, 2, 1, c["grid"].sampling.n_directions, grid_size=grid)
        res = expectation_batch(c["batch"], window, c["coarse_shell"], [ref], c["grid"], c["settings"], sums, None,
                                NO_STAGES)  # fmt: skip
        out.append((res, sums.backprojectors[0]))
    (a, bp_full), (b, bp_win) = out
    assert torch.equal(a.fine_pose, b.fine_pose)
    assert torch.equal(a.offsets_px, b.offsets_px) and torch.equal(a.class_index, b.class_index)
    assert torch.allclose(a.max_prob, b.max_prob, rtol=0, atol=1e-4)
    assert bp_win.size == size and bp_win.padded_size == 2 * box
    inside = bp_full.data[cube]
    assert torch.allclose(bp_win.data, inside, rtol=0, atol=1e-5 * float(inside.abs().max()))
    assert torch.allclose(bp_win.weight, bp_full.weight[cube], rtol=0, atol=1e-5 * float(bp_full.weight.max()))
    # nothing was inserted outside the window's cube
    outside = torch.ones_like(bp_full.weight, dtype=torch.bool)
    outside[cube] = False
    assert float(bp_full.weight[outside].abs().max()) == 0.0
