"""The M-step's slab transforms (padded_fft.py) and the windowed grids against whole-grid 3D transforms (float64):
RELION's gridding convolution and final inverse transform on the P³ grid, and the padded transform of a map."""

from __future__ import annotations

import math

import pytest
import torch

from cryorefine.fourier.grids import irfft3_centered, rfft3_centered
from cryorefine.projection.extract import prepare_padded_transform, sinc2_gridding_kernel, window_grid_size
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.padded_fft import SAME_DEVICE, blob_convolution, central_box_of_inverse
from cryorefine.reconstruction.reconstruct import blob_fourier_multiplier, reconstruct


def _embed(cube: torch.Tensor, size: int) -> torch.Tensor:
    """A centred cube (n, n, m) placed in the zero centred half grid (size, size, size//2 + 1)."""
    n, m = cube.shape[0], cube.shape[2]
    full = torch.zeros((size, size, size // 2 + 1), dtype=cube.dtype)
    lo = size // 2 - n // 2
    full[lo : lo + n, lo : lo + n, :m] = cube
    return full


def _hermitian_cube(n: int, m: int, seed: int) -> torch.Tensor:
    """A real (n, n, m) cube, symmetric on x = 0 (k and −k equal), as accumulators after enforce_hermitian_x0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((n, n, m), generator=g, dtype=torch.float64)
    if n % 2:  # odd: index i and n − 1 − i are mates
        a[..., 0] = (a[..., 0] + a.flip(0, 1)[..., 0]) / 2
    return a


@pytest.mark.parametrize("n, m, size", [(9, 5, 16), (16, 9, 16), (11, 6, 15)])
def test_blob_convolution_equals_the_whole_grid_transforms(n, m, size, monkeypatch):
    import cryorefine.reconstruction.padded_fft as padded_fft

    monkeypatch.setattr(padded_fft, "SLAB_BYTES", 1)  # one column and one row per slab
    a = _hermitian_cube(n, m, 1)
    blob = blob_fourier_multiplier(size)
    full = torch.fft.ifftshift(_embed(a, size).to(torch.complex128), dim=(0, 1))
    real = torch.fft.irfftn(full, s=(size, size, size), norm="forward")
    want = torch.fft.fftshift(torch.fft.rfftn(real * blob, norm="forward"), dim=(0, 1)).abs()
    lo = size // 2 - n // 2
    want = want[lo : lo + n, lo : lo + n, :m]
    got = torch.full_like(a, float("nan"))

    def consume(x0, x1, values):
        got[:, :, x0:x1] = values

    blob_convolution(lambda x0, x1: a[:, :, x0:x1], n, m, size, lambda z0, z1: blob[z0:z1], consume, SAME_DEVICE, a)
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(want.max()))
    # the factor of a few rows is those rows of the whole factor
    assert torch.allclose(blob_fourier_multiplier(size, (3, 7)), blob[3:7], rtol=1e-14, atol=0)


@pytest.mark.parametrize("n, m, size, box", [(9, 5, 16, 8), (16, 9, 16, 8), (11, 6, 22, 11), (7, 4, 30, 10)])
def test_central_box_equals_the_cropped_whole_inverse(n, m, size, box, monkeypatch):
    import cryorefine.reconstruction.padded_fft as padded_fft

    monkeypatch.setattr(padded_fft, "SLAB_BYTES", 1)
    g = torch.Generator().manual_seed(2)
    re, im = (torch.randn((n, n, m), generator=g, dtype=torch.float64) for _ in range(2))
    f = torch.complex(re, im)
    whole = irfft3_centered(torch.fft.ifftshift(_embed(f, size), dim=(0, 1)), size)
    o = size // 2 - box // 2
    want = whole[o : o + box, o : o + box, o : o + box]
    assert torch.allclose(central_box_of_inverse(f, size, box), want, rtol=0, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("box, pad", [(16, 2), (15, 2), (17, 1), (12, 3)])
def test_padded_transform_equals_the_whole_transform_and_its_window(box, pad):
    volume = torch.randn((box, box, box), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    size = box * pad
    o = size // 2 - box // 2
    padded = torch.zeros((size, size, size), dtype=torch.float64)
    padded[o : o + box, o : o + box, o : o + box] = volume / sinc2_gridding_kernel(box, pad, dtype=torch.float64)
    whole = torch.fft.fftshift(rfft3_centered(padded), dim=(0, 1))
    got = prepare_padded_transform(volume, pad).f_padded
    assert got.shape == whole.shape and torch.allclose(got, whole, rtol=0, atol=1e-9)
    s = window_grid_size(box / 5, box, pad)
    assert s < size and s % 2 == 0
    c, h = size // 2, s // 2
    window = prepare_padded_transform(volume, pad, s).f_padded
    assert torch.allclose(window, whole[c - h : c + h, c - h : c + h, : h + 1], rtol=0, atol=1e-9)


def test_window_grid_size_holds_every_corner_and_is_whole_when_not_smaller():
    assert window_grid_size(None, 32, 2) == 64
    assert window_grid_size(31.9, 64, 1) == 64  # 2·(31 + 2) = 66 is not smaller
    assert window_grid_size(10.0, 64, 2) == 2 * (20 + 2)


@pytest.mark.parametrize("iterations", [0, 10])
def test_reconstruct_from_windowed_accumulators_equals_the_whole_grid(iterations):
    """Accumulators with data inside shell 5 only: the windowed grid (S < P) gives the map of the whole grid."""
    box, pad, shell = 20, 2, 5
    size = box * pad
    g = torch.Generator().manual_seed(4)
    whole = BackProjector.zeros(box, pad, dtype=torch.float32)
    k = torch.arange(size) - size // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + torch.arange(size // 2 + 1)[None, None, :] ** 2)
    near = r < shell * pad + 1
    whole.data[near] = torch.randn(int(near.sum()), dtype=torch.complex64, generator=g)
    whole.weight[near] = torch.rand(int(near.sum()), generator=g) + 0.5
    s = window_grid_size(shell + 0.5, box, pad)
    c, h = size // 2, s // 2
    cube = (slice(c - h, c + h), slice(c - h, c + h), slice(0, h + 1))
    windowed = BackProjector(whole.data[cube].clone(), whole.weight[cube].clone(), box, pad)
    assert windowed.size == s < size and windowed.padded_size == size
    tau2 = torch.linspace(2.0, 0.1, box // 2 + 1, dtype=torch.float64)
    want = reconstruct(whole, tau2, max_shell=shell, gridding_iterations=iterations, particles=10.0)
    got = reconstruct(windowed, tau2, max_shell=shell, gridding_iterations=iterations, particles=10.0)
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_symmetrise_in_chunks_equals_one_chunk(monkeypatch):
    import cryorefine.reconstruction.symmetrise as symmetrise

    g = torch.Generator().manual_seed(5)
    shape = (20, 20, 11)
    data = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    weight = torch.rand(shape, generator=g)
    out = []
    for chunk in (1 << 22, 37):
        monkeypatch.setattr(symmetrise, "SYMMETRISE_CHUNK", chunk)
        bp = BackProjector(data.clone(), weight.clone(), 10, 2)
        symmetrise.symmetrise_backprojector(bp, "D3")
        out.append(bp)
    assert not torch.equal(out[0].weight, weight)
    assert torch.equal(out[0].data, out[1].data) and torch.equal(out[0].weight, out[1].weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("buffer", ["cuda", "cpu"])
def test_transforms_on_the_gpu_for_a_cube_on_the_host_equal_all_on_the_host(buffer, monkeypatch):
    """The memory plan's host M-step: the cube's work on the host, the padded transforms on the GPU by slabs, their
    buffer on the GPU or in pinned host memory; against the same reconstruction all on the GPU. (Against one all on
    the CPU the maps differ by ~1e-5 of their peak: RELION's tabulated blob rounds r/(d·pad) down to a table sample,
    and a last-bit difference in r between the devices' arithmetic moves a few voxels to the next sample; a 4e-16
    relative change of r alone moves this map by 1.3e-5 of its peak on the CPU.)"""
    import cryorefine.reconstruction.padded_fft as padded_fft

    monkeypatch.setattr(padded_fft, "SLAB_BYTES", 1 << 20)  # several slabs
    box, pad = 40, 2
    bp = BackProjector.zeros(box, pad, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    bp.data.real.normal_(generator=g)
    bp.weight.uniform_(generator=g)
    tau2 = torch.linspace(2.0, 0.01, box // 2 + 1, dtype=torch.float64)
    devices = padded_fft.SlabDevices(torch.device("cuda"), torch.device(buffer))
    on_gpu = BackProjector(bp.data.cuda(), bp.weight.cuda(), box, pad)
    for shell in (9, None):
        want = reconstruct(on_gpu, tau2, max_shell=shell, gridding_iterations=10, particles=20.0).cpu()
        got = reconstruct(bp, tau2, max_shell=shell, gridding_iterations=10, particles=20.0, devices=devices)
        assert got.device.type == "cpu"
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("size, join_angst", [(40, 30.0), (40, 4.0), (26, 12.0)])
def test_halves_joined_in_place_on_the_low_resolution_sphere(size, join_angst):
    """RELION's joinTwoHalvesAtLowResolution: the sums on padded radii <= ROUND(pad·CEIL(box·angpix/join)), read on
    the whole grid; elsewhere each half keeps its own."""
    from cryorefine.fourier.grids import centred_half_radius, relion_round
    from cryorefine.mstep.maximize import join_at_low_resolution_

    box, pad, angpix = 20, 2, 3.0
    g = torch.Generator().manual_seed(7)
    shape = (size, size, size // 2 + 1)
    halves = [BackProjector(torch.randn(shape, dtype=torch.complex64, generator=g), torch.rand(shape, generator=g),
                            box, pad) for _ in range(2)]  # fmt: skip
    before = [(bp.data.clone(), bp.weight.clone()) for bp in halves]
    join_at_low_resolution_(halves, join_angst, angpix)
    r = centred_half_radius(torch.arange(size) - size // 2, size // 2 + 1)
    low = torch.round(r**2) <= relion_round(pad * math.ceil(box * angpix / join_angst)) ** 2
    assert 0 < int(low.sum()) < low.numel()
    for bp, (d, w) in zip(halves, before):
        assert torch.equal(bp.data, torch.where(low, before[0][0] + before[1][0], d))
        assert torch.equal(bp.weight, torch.where(low, before[0][1] + before[1][1], w))


def _decaying_accumulators(box: int, pad: int, seed: int) -> BackProjector:
    """Accumulators as a refinement leaves them: weights falling 10⁴-fold from the origin to the edge (the CTF's
    envelope), noisy data, and a ball of the high-resolution shell where no particle contributed (weight and data 0)."""
    size = box * pad
    g = torch.Generator().manual_seed(seed)
    bp = BackProjector.zeros(box, pad, dtype=torch.float32)
    k = torch.arange(size) - size // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + torch.arange(size // 2 + 1)[None, None, :] ** 2)
    envelope = torch.exp(-9.2 * (r / (size // 2)) ** 2)
    bp.weight.copy_(envelope * (0.5 + torch.rand(bp.weight.shape, generator=g)))
    bp.data.copy_(torch.complex(torch.randn(bp.weight.shape, generator=g), torch.randn(bp.weight.shape, generator=g)))
    bp.data.mul_(bp.weight.sqrt())
    hole = (k[:, None, None] - 20) ** 2 + k[None, :, None] ** 2 + (torch.arange(size // 2 + 1) - 15)[None, None, :] ** 2
    bp.weight[hole < 36] = 0
    bp.data[hole < 36] = 0
    return bp


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("shell", [14, None])
def test_gridding_in_float32_gives_the_float64_map(shell, device, monkeypatch):
    """reconstruct() runs RELION's gridding iterations after the first in float32 (RELION: double): against all ten
    in float64 the map differs by ~1e-6 of its peak, also where the weights span 10⁴ (all ten in float32: 6e-5 for
    the unregularised whole map) and where a region of the window has none (there W grows 10⁶-fold an iteration,
    past float32's range, and multiplies zeros)."""
    box, pad = 40, 2
    host = _decaying_accumulators(box, pad, 8)
    bp = BackProjector(host.data.to(device), host.weight.to(device), box, pad)
    tau2 = torch.logspace(1, -3, box // 2 + 1, dtype=torch.float64, device=device)
    for regularised in (tau2, None):
        _assert_float64_map(bp, regularised, shell, 300.0, monkeypatch)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_gridding_of_a_class_of_one_particle_in_a_big_box(device, monkeypatch):
    """RELION's units make the weights d⁴ / particles times ours: for a box of 160 and one particle, W at its ceiling
    (in the ball without weights) times those units passes float32's range; the map must stay float64's there, where
    the data are 0 (a class3d run of a box-360 set gave NaN maps when a class fell to ~30 particles)."""
    box, pad = 160, 2
    host = _decaying_accumulators(box, pad, 8)
    bp = BackProjector(host.data.to(device), host.weight.to(device), box, pad)
    no_prior_beyond = torch.logspace(1, -3, box // 2 + 1, dtype=torch.float64, device=device)
    no_prior_beyond[10:] = 0.0  # RELION's stand-in prior, none where the weight is 0
    for regularised in (no_prior_beyond, None):
        _assert_float64_map(bp, regularised, 14, 1.0, monkeypatch)


def test_a_map_with_nan_stops_the_m_step():
    """A NaN in the accumulators (a GPU fault, an overflow like the one above) stops reconstruct() with one line
    instead of becoming the next iteration's reference."""
    bp = _decaying_accumulators(40, 2, 8)
    bp.data[40, 40, 3] = complex("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        reconstruct(bp, None, 4.0, 14, particles=300.0)


def _assert_float64_map(bp: BackProjector, tau2, shell, particles: float, monkeypatch) -> None:
    """reconstruct()'s map is all ten gridding iterations in float64's to 3e-6 of its peak, and finite."""
    import cryorefine.reconstruction.reconstruct as reconstruct_module

    def in_float64(weight, inside, iterations, size, devices, padded_size=None):
        start = inside.to(torch.float64)
        return reconstruct_module._gridding_iterations(start, weight, inside, iterations, size, devices, padded_size)

    got = reconstruct(bp, tau2, 4.0, shell, particles=particles)
    monkeypatch.setattr(reconstruct_module, "gridding_weights", in_float64)
    want = reconstruct(bp, tau2, 4.0, shell, particles=particles)
    monkeypatch.undo()
    assert torch.isfinite(got).all() and not torch.equal(got, want)
    error = float((got - want).abs().max() / want.abs().max())
    assert error < 3e-6, error
