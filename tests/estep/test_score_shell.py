"""--strict_highres_exp (EStepSettings.score_shell): pixels beyond the scored shell must not change which poses win,
and must still reach the reconstruction's sums (RELION scores with the coarse image size in both passes but stores
with the current size).

Data: the packaged 6msm model at box 64 (3 Å/px), 8 particles with CTF and SNR 0.5. A second copy of the batch has
its pixels beyond the scored shell replaced by large random values. With the limit both copies must give the same
poses and probabilities and different sums; without it (control) the corrupted copy's poses must change.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cryorefine.estep.expectation import expectation_batch
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.sums import WeightedSums
from cryorefine.geometry.healpix import make_sampling
from cryorefine.projection.extract import prepare_padded_transform
from simulated_batch import simulated_batch

BOX, ANGPIX, N = 64, 3.0, 8
SCORE_SHELL, WINDOW_SHELL, COARSE_SHELL = 10, 20, 8


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    truth, window, batch = simulated_batch(
        tmp_path_factory.mktemp("score_shell"), BOX, ANGPIX, N, WINDOW_SHELL, 0.5, 5, 3.0
    )
    js = window.prefix(SCORE_SHELL)
    g = torch.Generator().manual_seed(1)
    junk = 50.0 * torch.randn(N, window.size - js, 2, generator=g) * batch.f_masked.abs().mean()
    bad = dataclasses.replace(batch, f_masked=batch.f_masked.clone(), f_unmasked=batch.f_unmasked.clone())
    for f in (bad.f_masked, bad.f_unmasked):
        f[:, js:] = torch.complex(junk[..., 0], junk[..., 1])
    return dict(
        batch=batch,
        bad=bad,
        window=window,
        grid=PoseGrid.build(make_sampling(1, "C1", 0.0), 3.0, 1.5),
        ref=prepare_padded_transform(truth.float(), 2),
    )


def run(case, batch, score_shell):
    sums = WeightedSums.zeros(1, BOX, 2, 1, case["grid"].sampling.n_directions)
    settings = EStepSettings(angpix=ANGPIX, score_shell=score_shell)
    res = expectation_batch(batch, case["window"], COARSE_SHELL, [case["ref"]], case["grid"], settings, sums)
    return res, sums


def test_pixels_beyond_the_scored_shell_are_stored_not_scored(case):
    good, s_good = run(case, case["batch"], SCORE_SHELL)
    bad, s_bad = run(case, case["bad"], SCORE_SHELL)
    assert torch.equal(bad.fine_pose, good.fine_pose)  # the same fine samples
    torch.testing.assert_close(bad.offsets_px, good.offsets_px)
    torch.testing.assert_close(bad.max_prob, good.max_prob, rtol=1e-4, atol=1e-6)
    bp_good, bp_bad = s_good.backprojectors[0].data, s_bad.backprojectors[0].data
    assert (bp_bad - bp_good).abs().max() > 0.1 * bp_good.abs().max()  # the corrupted pixels were back-projected


def test_without_the_limit_the_corrupted_pixels_change_the_poses(case):
    good, _ = run(case, case["batch"], None)
    bad, _ = run(case, case["bad"], None)
    changed = (bad.fine_pose != good.fine_pose).any(1).numpy() | (
        (bad.offsets_px - good.offsets_px).abs().amax(1) > 1e-3
    ).numpy()
    assert changed.sum() >= N // 2
