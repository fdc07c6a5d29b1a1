"""The CPU's compiled trilinear loops (projection/cpu_kernels.py) and the GPU's extraction kernel (extract_kernel.py)
against the PyTorch operations (grid_sample; index_add_ of the 8 corners) in float64, on points inside, at the edge of
and beyond the grid."""

from __future__ import annotations

import numba
import pytest
import torch

from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection import cpu_kernels, extract, insert
from cryorefine.projection.extract import PaddedTransform
from cryorefine.projection.insert import BackProjector

BOX, PAD = 16, 2


def _case(dtype):
    g = torch.Generator().manual_seed(3)
    size = BOX * PAD
    f = torch.randn(size, size, size // 2 + 1, dtype=dtype, generator=g)
    # pixels of the whole plane up to and past Nyquist: both half-planes (the Friedel reads) and the grid's edge
    ky, kx = (
        k.flatten().to(f.real.dtype) for k in torch.meshgrid(torch.arange(-9, 10), torch.arange(-9, 10), indexing="ij")
    )
    rot = euler_to_matrix(*(torch.rand(30, generator=g, dtype=torch.float64) * s for s in (360.0, 180.0, 360.0)))
    return PaddedTransform(f, BOX, PAD), rot.to(f.real.dtype), ky, kx, g


def test_extraction_equals_grid_sample():
    t, rot, ky, kx, _ = _case(torch.complex128)
    compiled = extract.extract_central_slices_planar(t, rot, ky, kx)  # the CPU's loop
    reference = torch.empty_like(compiled)
    extract.extract_by_grid_sample(t, rot, ky, kx, reference)
    torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-12)
    assert compiled.abs().max() > 1.0


def test_power_with_the_planes():
    t, rot, ky, kx, _ = _case(torch.complex128)
    planes, power = extract.extract_planar_with_power(t, rot, ky, kx)
    torch.testing.assert_close(power, planes.square().sum(-2), rtol=1e-14, atol=0)


def test_extraction_float32_within_rounding():
    t, rot, ky, kx, _ = _case(torch.complex64)
    compiled = extract.extract_central_slices_planar(t, rot, ky, kx)
    reference = torch.empty_like(compiled)
    extract.extract_by_grid_sample(t, rot, ky, kx, reference)
    torch.testing.assert_close(compiled, reference, rtol=0, atol=2e-5)


def test_insertion_equals_index_add():
    t, rot, ky, kx, g = _case(torch.complex128)
    values = torch.randn(rot.shape[0], ky.numel(), dtype=torch.complex128, generator=g)
    weights = torch.rand(rot.shape[0], ky.numel(), dtype=torch.float64, generator=g)
    compiled = BackProjector.zeros(BOX, PAD, dtype=torch.float64)
    compiled.insert(rot, ky, kx, values, weights)  # the CPU's loop
    reference = BackProjector.zeros(BOX, PAD, dtype=torch.float64)
    insert.insert_by_index_add(reference, rot, ky, kx, values, weights)
    torch.testing.assert_close(compiled.data, reference.data, rtol=0, atol=1e-11)
    torch.testing.assert_close(compiled.weight, reference.weight, rtol=0, atol=1e-11)
    assert reference.weight.sum() > 100.0


def test_threaded_insertion_equals_one_thread(monkeypatch):
    t, rot, ky, kx, g = _case(torch.complex64)
    values = torch.randn(rot.shape[0], ky.numel(), dtype=torch.complex64, generator=g)
    weights = torch.rand(rot.shape[0], ky.numel(), generator=g)
    threaded = BackProjector.zeros(BOX, PAD)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))  # two copies of the accumulators, summed
    threaded.insert(rot, ky, kx, values, weights)
    monkeypatch.setattr(cpu_kernels, "PARALLEL_COPY_BYTES", 0)  # no room for a copy: one thread
    single = BackProjector.zeros(BOX, PAD)
    single.insert(rot, ky, kx, values, weights)
    torch.testing.assert_close(threaded.data, single.data, rtol=0, atol=1e-5)
    torch.testing.assert_close(threaded.weight, single.weight, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_extraction_matches_float64_grid_sample():
    """The CUDA extraction (extract_kernel.py) against grid_sample in float64 on the host, on the same points (inside,
    at the edge of and beyond the grid, both Friedel halves), with and without the power."""
    from cryorefine.projection import extract_kernel

    t, rot, ky, kx, _ = _case(torch.complex128)
    reference = torch.empty(rot.shape[0], 2, ky.numel(), dtype=torch.float64)
    extract.extract_by_grid_sample(t, rot, ky, kx, reference)
    gpu = PaddedTransform(t.f_padded.to(torch.complex64).cuda(), BOX, PAD)
    assert extract_kernel.available(gpu.f_padded), "Triton missing from the CUDA build: the fused kernel would not run"
    args = (rot.float().cuda(), ky.float().cuda(), kx.float().cuda())
    planes = extract.extract_central_slices_planar(gpu, *args).cpu().double()
    with_power, power = extract.extract_planar_with_power(gpu, *args)
    scale = float(reference.abs().max())
    assert float((planes - reference).abs().max()) < 1e-5 * scale
    assert torch.equal(with_power.cpu().double(), planes)
    torch.testing.assert_close(power.cpu().double(), reference.square().sum(-2), rtol=1e-5, atol=1e-5 * scale**2)
