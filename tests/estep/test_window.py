"""The E-step window's per-shell sums (Window.shell_sums: running sums over the pixels sorted by shell) against
numpy's bincount over each pixel's shell."""

import numpy as np
import pytest
import torch

from cryorefine.estep.images import Window


@pytest.mark.parametrize("n_shells", [5, 13, 20])  # fewer shells than the window's (the rest count in the last), more
def test_shell_sums_are_the_sums_over_each_shells_pixels(n_shells):
    window = Window.build(24, 12)
    shell = window.shell.numpy()
    assert (np.diff(shell) >= 0).all() and shell.min() >= 1
    values = torch.randn(3, window.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e3
    want = np.stack([np.bincount(np.minimum(shell, n_shells - 1), v, minlength=n_shells) for v in values.numpy()])
    got = window.shell_sums(values, n_shells)
    assert got.shape == (3, n_shells) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-9)
    assert (got[:, 0] == 0).all()  # no pixel of shell 0 in the window


def test_power_beyond_the_window_is_summed_per_shell_up_to_nyquist():
    """Window.beyond's pixels (the rfft half plane past the window, each conjugate pair once) and their per-shell sums
    through its running counts, against bincount over the shells of the same pixels."""
    from cryorefine.fourier.grids import counted_once_2d, shell_index_2d, sorted_shell_sums

    box, S = 24, 13
    window = Window.build(box, 7)
    idx, ends, npix = window.beyond()
    shells = shell_index_2d(box).flatten()
    want_idx = torch.nonzero((shells > 7) & (shells < S) & counted_once_2d(box).flatten()).squeeze(1)
    assert sorted(idx.tolist()) == want_idx.tolist()
    np.testing.assert_array_equal(npix.numpy(), np.bincount(shells[idx].numpy(), minlength=S))
    power = torch.rand(2, box * (box // 2 + 1), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = sorted_shell_sums(power[:, idx], ends)
    want = np.stack([np.bincount(shells[idx].numpy(), p[idx].numpy(), minlength=S) for p in power])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert (got[:, :8] == 0).all()  # nothing inside the window
