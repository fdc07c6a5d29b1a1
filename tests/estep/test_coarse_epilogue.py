"""The global search's fused coarse epilogue (CUDA, Triton) against PyTorch's in-place path and float64 block sums."""

import pytest
import torch

from cryorefine.estep import coarse_epilogue
from cryorefine.estep.weights import TOPK_BLOCK


def check_assembly(device: str) -> None:
    """Two classes of 3 particles × 5 translations × 3·1024 + 64·3 rotations (a partial program at the row's end),
    with and without a direction prior; one block of the prior at −inf (its sum is 0, not NaN)."""
    g = torch.Generator().manual_seed(7)
    n, K, T, R = 3, 2, 5, 3 * coarse_epilogue.COLUMNS_PER_PROGRAM + 3 * TOPK_BLOCK
    trans_prior = -torch.rand(n, T, generator=g) * 4
    stats = coarse_epilogue.BlockStats.empty(n, K * T * R, device)
    expected = []
    for k in range(K):
        cross = torch.randn(n, T, R, generator=g) * 30
        third = torch.rand(n, R, generator=g) * 50
        rot_prior = None
        reference = cross.clone().mul_(2.0).sub_(third[:, None, :]).add_(trans_prior[:, :, None])
        if k == 1:
            rot_prior = -torch.rand(1, R, generator=g) * 3
            rot_prior[0, TOPK_BLOCK : 2 * TOPK_BLOCK] = -torch.inf
            reference.add_(rot_prior[:, None, :])
        got = coarse_epilogue.assemble_scores_(
            cross.to(device), third.to(device), trans_prior.to(device),
            None if rot_prior is None else rot_prior.to(device), stats, k,
        )  # fmt: skip
        assert torch.equal(got.cpu(), reference)  # the same floats as the in-place path
        expected.append(reference.reshape(n, -1))
    blocks = torch.cat(expected, 1).double().view(n, -1, TOPK_BLOCK)
    largest = blocks.amax(2)
    shift = torch.where(torch.isinf(largest), 0.0, largest)
    sum_exp = torch.exp(blocks - shift[..., None]).sum(2)
    assert torch.equal(stats.largest.cpu().double(), largest)
    assert torch.allclose(stats.sum_exp.cpu().double(), sum_exp, rtol=1e-5, atol=0)
    assert (stats.sum_exp.cpu() == 0).sum() == n * T  # the −inf block of each (particle, translation) of class 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_scores_and_block_sums_match_pytorch():
    assert coarse_epilogue.usable(torch.zeros(1, device="cuda"), 64), "Triton missing from the CUDA build"
    check_assembly("cuda")


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_coarse_significant_set_as_without_the_epilogue(tmp_path, monkeypatch, classes):
    """A global search's coarse stage on a small simulated batch (with 3 classes: references scaled apart and a
    direction prior): the same scores as PyTorch's in-place path, and the set from the epilogue's block sums is the
    softmax path's, up to rounding at its edge."""
    from dataclasses import replace

    from cryorefine.estep import diff2, weights

    from test_memory import make_case

    c = make_case(tmp_path, device="cuda")
    refs = [replace(c["ref"], f_padded=c["ref"].f_padded * (1.0 + 0.1 * k)) for k in range(classes)]
    settings = c["settings"]
    if classes > 1:
        dirs = c["grid"].sampling.n_directions
        prior = torch.log_softmax(torch.randn(classes, dirs, generator=torch.Generator().manual_seed(3)), 1)
        settings = replace(settings, direction_log_prior=prior)
    jc = c["window"].prefix(c["coarse_shell"])
    args = (c["batch"], c["window"], jc, refs, c["grid"], settings, None, None)
    logp, _, blocks = diff2.coarse_log_posterior(*args)
    assert blocks is not None, "the epilogue did not run"
    fused = weights.coarse_significant(logp, settings, blocks)
    monkeypatch.setattr(coarse_epilogue, "usable", lambda *a: False)
    logp_plain, _, none = diff2.coarse_log_posterior(*args)
    assert none is None and torch.equal(logp, logp_plain)
    plain = weights.coarse_significant(logp_plain, settings)
    assert (fused[1] - plain[1]).abs().max() <= 1
    assert (fused[0] != plain[0]).sum() <= len(logp) and abs(fused[2] - plain[2]) <= len(logp)
