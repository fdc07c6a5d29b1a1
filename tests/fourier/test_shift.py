"""Phase shifts (fourier/shift.py, estep.diff2.translated): a Fourier shift by whole pixels against np.roll, and the
E-step's shift by a centre plus a grid against one shift by their sum."""

from __future__ import annotations

import numpy as np
import torch

from cryorefine.estep.diff2 import translated
from cryorefine.estep.images import Window
from cryorefine.fourier.shift import phase_shift_factors, shift_images_rfft


def test_whole_pixel_shift_is_a_roll():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(32, 32, generator=g, dtype=torch.float64)
    moved = torch.fft.irfft2(
        shift_images_rfft(torch.fft.rfft2(image), torch.tensor([3.0, -5.0]).double(), 32), s=(32, 32)
    )
    np.testing.assert_allclose(moved.numpy(), np.roll(image.numpy(), (-5, 3), axis=(0, 1)), atol=1e-12)


def test_centre_plus_grid_equals_the_sum_shift():
    built = Window.build(48, 20)
    window = Window(built.flat_index, built.ky.double(), built.kx.double(), built.shell, built.box)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, window.size, dtype=torch.complex128, generator=g)
    centre = (torch.rand(5, 2, generator=g, dtype=torch.float64) - 0.5) * 8.0
    grid = (torch.rand(7, 2, generator=g, dtype=torch.float64) - 0.5) * 6.0
    direct = x[:, None, :] * phase_shift_factors(window.ky, window.kx, centre[:, None, :] + grid[None], window.box)
    torch.testing.assert_close(translated(x, window, centre, grid), direct, rtol=0, atol=1e-12)
