"""Radial maps by look-up (grids.radial_map) give the values of evaluating the profile pixel by pixel, bit for bit."""

import math

import pytest
import torch

from cryorefine.fourier.filters import soft_sphere
from cryorefine.fourier.grids import centred_squared_radius, radial_map
from cryorefine.projection.extract import sinc2_gridding_kernel


def direct_squared_radius(shape, dtype):
    """r² of every pixel from the centre pixel n//2, computed per pixel in ``dtype``."""
    axes = [torch.arange(n, dtype=dtype) - n // 2 for n in shape]
    return sum(g**2 for g in torch.meshgrid(*axes, indexing="ij"))


def direct_radius(shape, dtype):
    return torch.sqrt(direct_squared_radius(shape, dtype))


@pytest.mark.parametrize("shape", [(7, 7), (8, 8), (9, 10, 11), (16, 16, 16), (33, 33, 33)])
def test_squared_radius_and_a_profile_match_pixel_by_pixel(shape):
    r = direct_radius(shape, torch.float64)
    assert torch.equal(centred_squared_radius(shape).double(), direct_squared_radius(shape, torch.float64))
    profile = lambda x: torch.exp(-x / 3.0) * torch.cos(x)  # noqa: E731
    assert torch.equal(radial_map(shape, profile, dtype=torch.float64), profile(r))


@pytest.mark.parametrize(
    "shape,radius,edge", [((40, 40, 40), 12.3, 5.0), ((31, 31), 10.0, 3.0), ((24,) * 3, 20.0, 0.0)]
)
def test_soft_sphere_is_the_raised_cosine_per_pixel(shape, radius, edge):
    r = direct_radius(shape, torch.float64)
    cosine = 0.5 + 0.5 * torch.cos(math.pi * (r - radius) / max(edge, 1e-9))
    expect = torch.where(r <= radius, 1.0, torch.where(r >= radius + edge, 0.0, cosine))
    assert torch.equal(soft_sphere(shape, radius, edge, dtype=torch.float64), expect)
    assert torch.equal(soft_sphere(shape, radius, edge), expect.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gridding_kernel_is_sinc_squared_per_pixel(dtype):
    box, pad = 21, 2
    expect = torch.sinc(direct_radius((box,) * 3, dtype) / (box * pad)) ** 2
    got = sinc2_gridding_kernel(box, pad, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, expect)
