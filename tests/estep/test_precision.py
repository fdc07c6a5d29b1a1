"""--precision of the coarse pass (fp32, tf32, fp16) against an independent float64 diff2, on realistic data.

Data: the packaged 6msm model at box 64 (3 Å/px), 16 particles with CTF and SNR 0.05, σ² estimated from the images
(as the first iteration does), 576 coarse rotations × 13 translations at a 256-pixel coarse window. The reference
computes diff2 = Σ_j |X̃_j(t) − s C_j P_j|² / (2σ²_j) elementwise in float64 (no expansion, no matrix products),
from float64 central slices. The significant set is the reference posterior's (fraction 0.999). Checked per mode:
max |Δdiff2| on the significant samples (< 0.05), and the same best coarse rotation for every particle.
Measured here (CPU): fp32 ~1e-4, fp16 ~0.02 (fp16 is emulated on the CPU with float32 products of float16-rounded
operands, the numbers cuBLAS gives); tf32 and the cuBLAS fp16 path run in the GPU-marked test.
"""

from __future__ import annotations

import pytest
import torch

from cryorefine.estep.diff2 import coarse_scores, translation_log_prior
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.weights import significant_mask
from cryorefine.estep.images import Window
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.precision import matmul_nt, row_scaled_half
from cryorefine.fourier.shift import phase_shift_factors
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.healpix import make_sampling
from cryorefine.projection.extract import extract_central_slices, prepare_padded_transform
from simulated_batch import simulated_batch

BOX, ANGPIX, N = 64, 3.0, 16
COARSE_SHELL, WINDOW_SHELL = 12, 21
DIFF2_TOL = 0.05  # absolute, on the significant samples
FP32_TOL = 1e-3


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    vol, window, batch = simulated_batch(
        tmp_path_factory.mktemp("precision"), BOX, ANGPIX, N, WINDOW_SHELL, 0.05, 3, 4.0
    )
    grid = PoseGrid.build(make_sampling(1, "C1", 0.2), 3.0, 1.5)
    d = dict(
        batch=batch,
        window=window,
        grid=grid,
        jc=window.prefix(COARSE_SHELL),
        ref32=prepare_padded_transform(vol.float(), 2),
    )
    d.update(reference_diff2(d, prepare_padded_transform(vol, 2)))
    return d


def reference_diff2(d, ref64) -> dict:
    """float64, elementwise: diff2 (n, T, R) with the constant Σ w|X|², its significant set and best coarse
    rotations."""
    b, win, grid, jc = d["batch"], d["window"], d["grid"], d["jc"]
    ky, kx = win.ky[:jc].double(), win.kx[:jc].double()
    rot = euler_to_matrix(*(torch.as_tensor(grid.coarse_eulers_deg[:, i], dtype=torch.float64) for i in range(3)))
    w = (
        b.inv_sigma2[:, :jc].double() * 0.5 * ((kx != 0) | (ky >= 0))
    )  # RELION scores the kx = 0 column's ky >= 0 half only
    # RELION's projector stops at the coarse image's radius (r_max): beyond it the projection is zero
    sc = b.scale[:, None].double() * b.ctf[:, :jc].double() * (kx**2 + ky**2 <= COARSE_SHELL**2)
    off = b.old_offset_px.double()[:, None, :] + grid.translations_px.double()[None]  # (n, T, 2)
    xt = b.f_masked[:, :jc].to(torch.complex128)[:, None, :] * phase_shift_factors(ky, kx, off, BOX)  # (n, T, jc)
    diff2 = torch.empty(N, grid.n_translations, grid.n_rotations, dtype=torch.float64)
    for r0 in range(0, grid.n_rotations, 128):
        p = extract_central_slices(ref64, rot[r0 : r0 + 128], ky, kx)  # (r, jc)
        res = xt[:, :, None, :] - sc[:, None, None, :] * p[None, None]
        diff2[:, :, r0 : r0 + 128] = ((res.real**2 + res.imag**2) * w[:, None, None, :]).sum(-1)
    prior = translation_log_prior(off, EStepSettings(angpix=ANGPIX))[:, :, None]
    mask = significant_mask((prior - diff2).reshape(N, -1), 0.999, 0).mask
    return dict(
        diff2=diff2,
        const=(w * xt[:, 0].abs() ** 2).sum(-1),
        prior=prior,
        significant=mask.reshape(diff2.shape),
        best=_best_rotation(diff2, prior),
    )


def _best_rotation(diff2: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    return (prior - diff2).reshape(N, -1).argmax(1) % diff2.shape[-1]


def coarse_errors(d, precision: str, device=None, local=None):
    """(max |Δdiff2| on the significant samples, best rotations) of production in ``precision``."""
    move = (lambda x: x) if device is None else (lambda x: x.to(device))
    b = d["batch"]
    batch = type(b)(**{k: (move(v) if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()})
    grid = d["grid"]
    if device is not None:
        grid = PoseGrid(
            grid.sampling, move(grid.translations_px), move(grid.translation_children_px), grid.offset_step_px, device
        )
    win = Window(*(move(getattr(d["window"], k)) for k in ("flat_index", "ky", "kx", "shell")), BOX)
    ref = type(d["ref32"])(move(d["ref32"].f_padded), BOX, 2)
    d2 = -coarse_scores(batch, win, d["jc"], [ref], grid, local, precision=precision)[:, 0].cpu().double()
    d2 = d2 + d["const"][:, None, None]
    err = (d2 - d["diff2"]).abs()
    return float(err[d["significant"]].max()), _best_rotation(d2, d["prior"])


def test_significant_set_is_a_real_selection(case):
    counts = case["significant"].reshape(N, -1).sum(1)
    print(f"\nsignificant coarse samples per particle: {counts.tolist()} of {case['significant'][0].numel()}")
    assert counts.max() > 1 and counts.max() < case["significant"][0].numel() // 10


@pytest.mark.parametrize("precision, tol", [("fp32", FP32_TOL), ("fp16", DIFF2_TOL)])
def test_coarse_diff2_matches_float64(case, precision, tol):
    err, best = coarse_errors(case, precision)
    print(
        f"\n[{precision}] max |Δdiff2| on significant samples = {err:.3g}; "
        f"same best rotation for {int((best == case['best']).sum())}/{N}"
    )
    assert err < tol
    assert torch.equal(best, case["best"])


def test_fp16_really_rounds_to_half_precision(case):
    """fp16 must differ from fp32 by about float16's rounding (a silent fallback to fp32 would pass the bounds)."""
    e16, _ = coarse_errors(case, "fp16")
    e32, _ = coarse_errors(case, "fp32")
    assert e16 > 20 * e32


def test_fp16_local_search_products_equal_global(case):
    """The batched (local-search) products give the global ones when every rotation is a candidate."""
    R = case["grid"].n_rotations
    ids = torch.arange(R).repeat(N, 1)
    local = (ids, torch.zeros(N, R), torch.ones(N, R, dtype=torch.bool))
    b, win, grid, jc, ref = case["batch"], case["window"], case["grid"], case["jc"], case["ref32"]
    glob = coarse_scores(b, win, jc, [ref], grid, None, precision="fp16")
    loc = coarse_scores(b, win, jc, [ref], grid, local, precision="fp16")
    assert (glob - loc).abs().max() < 1e-3


def test_row_scaling_keeps_fp16_in_range():
    """Rows far outside float16's range (1e-8, 1e8) keep their relative precision after scaling."""
    x = torch.randn(4, 300, dtype=torch.float64) * torch.tensor([1e-8, 1.0, 1e6, 1e8], dtype=torch.float64)[:, None]
    y = torch.randn(5, 300, dtype=torch.float64)
    h, e = row_scaled_half(x.float())
    assert (
        torch.isfinite(h.float()).all()
        and (h.float().abs().amax(1) <= 1).all()
        and (h.float().abs().amax(1) >= 0.5).all()
    )
    prod = matmul_nt(x.float(), y.float(), "fp16").double()
    exact = x @ y.T
    rel = (prod - exact).abs() / (x.abs().amax(1, keepdim=True) * y.abs().amax(1)[None] * 300**0.5)
    assert rel.max() < 4e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_gpu_coarse_diff2_matches_float64(case, precision):
    err, best = coarse_errors(case, precision, device="cuda")
    print(
        f"\n[gpu {precision}] max |Δdiff2| on significant samples = {err:.3g}; "
        f"same best rotation for {int((best == case['best']).sum())}/{N}"
    )
    assert err < (FP32_TOL if precision == "fp32" else DIFF2_TOL)
    assert torch.equal(best, case["best"])
    assert not torch.backends.cuda.matmul.allow_tf32  # tf32 stays scoped to the coarse products


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reduced_precisions_really_differ_from_fp32(case):
    e32, _ = coarse_errors(case, "fp32", device="cuda")
    for precision in ("tf32", "fp16"):
        e, _ = coarse_errors(case, precision, device="cuda")
        assert e > 5 * e32, precision


def test_tf32_is_fp32_off_cuda():
    """The default (tf32) runs as fp32 on the CPU, exactly: no TF32 there, and the CPU's compiled local-search loop
    takes fp32 only; CUDA keeps what it was given."""
    from cryorefine.estep.precision import for_device
    from cryorefine.refine.config import RefineConfig

    assert RefineConfig.__dataclass_fields__["precision"].default == "tf32"
    assert for_device("tf32", "cpu") == "fp32" and for_device("tf32", torch.device("cpu")) == "fp32"
    assert for_device("tf32", "cuda") == for_device("tf32", "cuda:1") == "tf32"
    assert for_device("fp16", "cpu") == "fp16" and for_device("fp32", "cuda") == "fp32"
