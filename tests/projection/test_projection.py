"""Fourier-slice projection and back-projection against analytic Gaussian-blob references (float64)."""

import math

import pytest
import torch

from cryorefine.fourier.grids import irfft2_centered
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection.extract import extract_central_slices, prepare_padded_transform, project_rfft
from cryorefine.projection.insert import BackProjector
from cryorefine.reconstruction.reconstruct import reconstruct
from cryorefine.reconstruction.fsc import fsc_curve

SIGMA = 1.6


def blobs(n=6, box=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * box * 0.5  # (x, y, z) px from centre


def blob_volume(centres, box, sigma=SIGMA):
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    v = torch.zeros(box, box, box, dtype=torch.float64)
    for cx, cy, cz in centres:
        v += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return v


def blob_projection(centres, A, box, shift=(0.0, 0.0)):
    """Analytic projection along z of the blob volume rotated by A: blob c lands at (A c)_xy + shift."""
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    p = torch.zeros(box, box, dtype=torch.float64)
    for pos in centres @ A.T:
        p += (
            SIGMA
            * math.sqrt(2 * math.pi)
            * torch.exp(-((x - pos[0] - shift[0]) ** 2 + (y - pos[1] - shift[1]) ** 2) / (2 * SIGMA**2))
        )
    return p


@pytest.mark.parametrize("box", [40, 41])
def test_projection_matches_analytic_blobs(box, device, dtype):
    centres = blobs(box=box)
    vol = blob_volume(centres, box)
    angles = torch.tensor([[0.0, 0.0, 0.0], [30.0, 60.0, 100.0], [-120.0, 135.0, 45.0]], dtype=torch.float64)
    A = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    proj = project_rfft(prepare_padded_transform(vol.to(device, dtype), 2), A.to(device, dtype))
    imgs = irfft2_centered(proj, box).cpu().double()
    for i in range(len(A)):
        ref = blob_projection(centres, A[i], box)
        rel = (imgs[i] - ref).norm() / ref.norm()
        # pad 2 with RELION's sinc² pre-correction: ~1.5-2 % for oblique slices, ~4 % for grid-aligned ones
        # (there the correction is not undone by interpolation; RELION's projector behaves the same)
        assert rel < 0.05, rel
        # negative control: the transposed matrix must not match
        wrong = blob_projection(centres, A[i].T, box)
        if i > 0:
            assert (imgs[i] - wrong).norm() / wrong.norm() > 0.3


@pytest.mark.parametrize("box", [32, 33])
def test_backprojection_round_trip(box):
    centres = blobs(n=8, box=box, seed=1)
    vol = blob_volume(centres, box, sigma=1.0)  # sharp blobs: signal out to Nyquist
    g = torch.Generator().manual_seed(0)
    n = 3000
    rot = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    tilt = torch.rad2deg(torch.acos(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1))
    psi = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    A = euler_to_matrix(rot, tilt, psi)
    t = prepare_padded_transform(vol, 2)
    from cryorefine.fourier.grids import rfft_freqs_2d

    ky, kx = (a.flatten() for a in rfft_freqs_2d(box, dtype=torch.float64))
    slices = extract_central_slices(t, A, ky, kx)
    bp = BackProjector.zeros(box, 2, dtype=torch.float64)
    bp.insert(A, ky, kx, slices, torch.ones_like(slices.real))
    rec = reconstruct(bp)
    f = fsc_curve(rec, vol)
    assert f[1 : box // 3].min() > 0.99, f  # out to 2/3 of Nyquist
    assert f[1 : int(box * 0.45)].min() > 0.9, f
    rel = (rec - vol).norm() / vol.norm()
    assert rel < 0.05, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width", [4, 2, 1], ids=["quad-reductions", "pair-reductions", "scalar-atomics"])
def test_gpu_fused_insertion_matches_float64_scatter(width, monkeypatch):
    """The CUDA insertion (one fused kernel) against the float64 scatter path on the CPU, with slices that reach
    past the padded grid's edge (the clamped corners) and both Friedel halves; with each reduction width
    (insert_kernel.WIDTHS: vector reductions on compute capability 9.0 and later, scalar atomic adds)."""
    from cryorefine.projection import insert_kernel

    if width > 1 and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the GPU has no vector reductions (compute capability below 9.0)")
    monkeypatch.setattr(insert_kernel, "reduction_width", lambda capability, voxels, spare_bytes=0: width)

    torch.manual_seed(3)
    box, pad, r = 40, 2, 700
    ky, kx = torch.meshgrid(
        torch.arange(-box // 2, box // 2, dtype=torch.float64),
        torch.arange(0, box // 2 + 1, dtype=torch.float64),
        indexing="ij",
    )
    ky, kx = ky.flatten(), kx.flatten()  # the whole rfft square, corners beyond Nyquist included
    A = euler_to_matrix(torch.rand(r) * 360, torch.rand(r) * 180, torch.rand(r) * 360)
    values = torch.randn(r, kx.numel(), dtype=torch.complex128)
    weights = torch.rand(r, kx.numel(), dtype=torch.float64)
    ref = BackProjector.zeros(box, pad, dtype=torch.float64)
    ref.insert(A, ky, kx, values, weights)
    gpu = BackProjector.zeros(box, pad, device="cuda")
    assert insert_kernel.available(gpu.weight), "Triton missing from the CUDA build: the fused kernel would not run"
    gpu.insert(
        A.float().cuda(),
        ky.float().cuda(),
        kx.float().cuda(),
        values.to(torch.complex64).cuda(),
        weights.float().cuda(),
    )
    err_d = float((gpu.data.cpu().to(torch.complex128) - ref.data).abs().max() / ref.data.abs().max())
    err_w = float((gpu.weight.cpu().double() - ref.weight).abs().max() / ref.weight.abs().max())
    print(f"fused insertion vs float64 scatter: max rel err data {err_d:.2e}, weight {err_w:.2e}")
    assert err_d < 1e-5 and err_w < 1e-5


def test_reduction_width_keeps_the_quads_grid_small():
    """Quads (a transient interleaved grid of 16 bytes a voxel) only where that grid fits QUAD_GRID_BYTES or half the
    spare memory; pairs (no extra memory) above it, e.g. a box-450 map's whole padded grid on a small card; scalar
    atomics before compute capability 9.0."""
    from cryorefine.projection.insert_kernel import QUAD_GRID_BYTES, reduction_width

    betagal_window = 186 * 186 * 94  # the order-6 local iterations' grid (box 100, window 45 shells)
    trpv1_order8 = 464 * 464 * 233  # the full TRPV1-like set's order-8 grid (box 256, window 115 shells): 0.8 GB
    box450 = 900 * 900 * 451
    assert reduction_width((9, 0), betagal_window) == 4
    assert reduction_width((9, 0), box450) == 2 and 16 * box450 > QUAD_GRID_BYTES
    assert reduction_width((9, 0), box450, spare_bytes=2 * 16 * box450 - 2) == 2  # half the spare memory is too little
    assert reduction_width((9, 0), box450, spare_bytes=2 * 16 * box450) == 4
    assert reduction_width((9, 0), trpv1_order8, spare_bytes=60 << 30) == 4  # an 80 GB card after a tile
    assert reduction_width((9, 0), trpv1_order8, spare_bytes=1 << 30) == 2  # an 11 GB card
    assert reduction_width((8, 0), betagal_window, spare_bytes=60 << 30) == 1
