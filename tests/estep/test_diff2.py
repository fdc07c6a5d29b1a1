"""diff2.py's coarse pass: the GPU's padded product pixels change no score."""

import pytest
import torch

from cryorefine.estep import diff2


def test_product_pixels_pad_global_searches_on_a_gpu_only():
    assert diff2.product_pixels(1051, local=False, on_gpu=True) == 1056
    assert diff2.product_pixels(1056, local=False, on_gpu=True) == 1056
    assert diff2.product_pixels(1051, local=True, on_gpu=True) == 1051  # the fused kernel reads no rows
    assert diff2.product_pixels(1051, local=False, on_gpu=False) == 1051


@pytest.mark.parametrize("shell", [4, 5, 7])
def test_padded_coarse_pixels_give_the_same_scores(tmp_path, monkeypatch, shell):
    """The coarse scores with the GPU's zero-weight padding (forced here on the CPU) equal the unpadded ones."""
    from test_memory import make_case

    c = make_case(tmp_path)
    jc = c["window"].prefix(shell)
    assert jc % diff2.ALIGNED_PIXELS  # a window that needs padding
    args = (c["batch"], c["window"], jc, [c["ref"]], c["grid"])
    plain = diff2.coarse_scores(*args)
    pixels = diff2.product_pixels
    monkeypatch.setattr(diff2, "product_pixels", lambda jc, local, on_gpu: pixels(jc, local, True))
    assert torch.equal(diff2.coarse_scores(*args), plain)
