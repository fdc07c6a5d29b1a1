"""Coarse-pass precision modes (--precision fp32 / tf32 / fp16) on the GPU: speed of the coarse matrix products and
their diff2 error against float64, on realistic shapes.

usage: python bench/precision_modes.py OUT_DIR [--boxes 100 256] [--particles 128] [--healpix_order 2] [--repeats 20]

Per box: the packaged 6msm model simulated with CTF and SNR 0.05 (box × pixel size = 300 Å), σ² estimated from the
images, 4608 coarse rotations (HEALPix order 2) × the translations of --offset_range/--offset_step, a coarse window
of box/4 shells (late global iterations). Per mode:
- gemm_ms: the two coarse products (cross term [n·T, 2jc] × [2jc, R] and |P|² term [n, jc] × [jc, R]) alone, median
  of --repeats after warm-up (CUDA events), and the TFLOP/s this makes;
- coarse_pass_ms: the whole coarse pass (diff2.coarse_scores: shifts, slice extraction, products);
- the error of diff2 against float64 (the same expansion with float64 slices and float64 products, ~1e-12 off the
  exact value): max and median |Δdiff2| on the significant samples of the float64 posterior (fraction 0.999, with
  the translation prior), and the fraction of particles with the same best coarse sample (rotation).
Writes OUT_DIR/precision_modes.json and OUT_DIR/precision_modes.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.estep.diff2 import as_real, coarse_scores, translated, translation_log_prior
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.weights import significant_mask
from cryorefine.estep.images import Window, prepare_batch
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.precision import PRECISIONS, matmul_nt
from cryorefine.fourier.shift import phase_shift_factors
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.healpix import make_sampling
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.mstep.noise import initial_sigma2
from cryorefine.projection.extract import extract_central_slices, prepare_padded_transform
from cryorefine.simulate import simulate_particles

FIELD_OF_VIEW_ANGST = 300.0
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: to check the errors only


def cuda_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events), after two warm-up calls; NaN on the CPU."""
    if DEVICE.type != "cuda":
        return float("nan")
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def make_case(box: int, n: int, order: int, offset_range: float, offset_step: float, work: Path):
    angpix = FIELD_OF_VIEW_ANGST / box
    xyz, w = read_atoms(packaged_model())
    simulate_particles(
        atoms_to_map(xyz, w, box, angpix, bfactor=50.0), angpix, work, n, snr=0.05, seed=3, max_shift_angst=4.0
    )
    table = load_particles(work / "particles.star")
    truth, _ = read_map(work / "truth.mrc")
    dev = DEVICE
    window = Window.build(box, box // 2 - 1, dev)
    batch = prepare_batch(
        table,
        np.arange(n),
        window,
        initial_sigma2(table, 1)[0].to(dev),
        torch.ones(1, dtype=torch.float64),
        0.8 * box * angpix,
        angpix,
        True,
        True,
        torch.Generator().manual_seed(0),
        dev,
    )
    grid = PoseGrid.build(make_sampling(order, "C1", 0.2), offset_range, offset_step, device=dev)
    vol = torch.from_numpy(truth).to(dev)
    return dict(
        batch=batch,
        window=window,
        grid=grid,
        jc=window.prefix(box // 4),
        shell=box // 4,
        angpix=angpix,
        ref32=prepare_padded_transform(vol.float(), 2),
        ref64=prepare_padded_transform(vol.double(), 2),
    )


def float64_diff2(c) -> torch.Tensor:
    """(n, T, R) diff2 without the per-particle constant, in float64 (slices and products)."""
    b, win, grid, jc = c["batch"], c["window"], c["grid"], c["jc"]
    ky, kx = win.ky[:jc].double(), win.kx[:jc].double()
    rot = euler_to_matrix(*(torch.as_tensor(grid.coarse_eulers_deg[:, i], dtype=torch.float64) for i in range(3))).to(
        DEVICE
    )
    # RELION's rules, as the coarse pass: the kx = 0 column scored on its ky >= 0 half only, and the projection zero
    # beyond the coarse image's radius (tests/estep/test_precision.py's float64 reference)
    w = b.inv_sigma2[:, :jc].double() * 0.5 * ((kx != 0) | (ky >= 0))
    sc = b.scale[:, None].double() * b.ctf[:, :jc].double() * (kx**2 + ky**2 <= c["shell"] ** 2)
    off = b.old_offset_px.double()[:, None, :] + grid.translations_px.double()[None]
    xt = b.f_masked[:, :jc].to(torch.complex128)[:, None, :] * phase_shift_factors(ky, kx, off, win.box)
    a = as_real(xt * (w * sc)[:, None, :])  # (n, T, 2jc)
    p = extract_central_slices(c["ref64"], rot, ky, kx)  # (R, jc)
    n, T = a.shape[:2]
    cross = (a.reshape(n * T, -1) @ as_real(p).T).reshape(n, T, -1)
    third = (w * sc * sc) @ (p.real**2 + p.imag**2).T
    return third[:, None, :] - 2.0 * cross


def coarse_operands(c):
    """The coarse products' operands as the coarse pass forms them: a (n·T, 2jc), [Re, Im] slices (R, 2jc), b (n, jc),
    |P|² (R, jc)."""
    b, win, grid, jc = c["batch"], c["window"], c["grid"], c["jc"]
    w = b.inv_sigma2[:, :jc] * 0.5
    sc = b.scale[:, None] * b.ctf[:, :jc]
    xt = translated(b.f_masked[:, :jc], win, b.old_offset_px, grid.translations_px)
    a = as_real(xt * (w * sc)[:, None, :])
    p = extract_central_slices(c["ref32"], grid.coarse_rotations, win.ky[:jc], win.kx[:jc])
    return a.reshape(-1, a.shape[-1]), as_real(p), w * sc * sc, p.real**2 + p.imag**2


def run_box(box: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        c = make_case(box, args.particles, args.healpix_order, args.offset_range, args.offset_step, Path(tmp))
    b, grid, jc = c["batch"], c["grid"], c["jc"]
    n, T, R = len(b), grid.n_translations, grid.n_rotations
    ref = float64_diff2(c)
    off = b.old_offset_px[:, None, :] + grid.translations_px[None]
    prior = translation_log_prior(off, EStepSettings(angpix=c["angpix"])).double()[:, :, None]
    mask, nsig, _ = significant_mask((prior - ref).reshape(n, -1), 0.999, 0)
    mask = mask.reshape(ref.shape)
    best_ref = (prior - ref).reshape(n, -1).argmax(1)
    a, p_real, bb, p2 = coarse_operands(c)
    flops = 2.0 * a.shape[0] * a.shape[1] * R + 2.0 * bb.shape[0] * bb.shape[1] * R
    out = {
        "box": box,
        "angpix": c["angpix"],
        "particles": n,
        "translations": T,
        "rotations": R,
        "coarse_pixels": jc,
        "significant_per_particle_median": float(nsig.double().median()),
        "modes": {},
    }
    for mode in PRECISIONS:
        d2 = -coarse_scores(b, c["window"], jc, [c["ref32"]], grid, precision=mode)[:, 0].double()
        err = (d2 - ref).abs()[mask]
        best = (prior - d2).reshape(n, -1).argmax(1)
        gemm = cuda_ms(lambda: (matmul_nt(a, p_real, mode), matmul_nt(bb, p2, mode)), args.repeats)
        whole = cuda_ms(
            lambda: coarse_scores(b, c["window"], jc, [c["ref32"]], grid, precision=mode),
            args.repeats,
        )
        out["modes"][mode] = {
            "gemm_ms": gemm,
            "gemm_tflops": flops / gemm / 1e9,
            "coarse_pass_ms": whole,
            "max_abs_diff2_significant": float(err.max()),
            "median_abs_diff2_significant": float(err.median()),
            "same_best_sample": float((best == best_ref).double().mean()),
            "same_best_rotation": float((best % R == best_ref % R).double().mean()),
        }
        print(json.dumps({"box": box, "mode": mode, **out["modes"][mode]}), flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# Coarse-pass precision modes on {result['device']}",
        "",
        f"torch {result['torch']}, commit {result['commit']}; diff2 errors against float64 on the significant samples.",
        "",
        "| box | n × T × R × jc | mode | GEMM ms | TFLOP/s | coarse pass ms | max abs Δdiff2 | median abs Δdiff2 "
        "| same best rotation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["boxes"]:
        shape = f"{r['particles']} × {r['translations']} × {r['rotations']} × {r['coarse_pixels']}"
        for mode, m in r["modes"].items():
            lines.append(
                f"| {r['box']} | {shape} | {mode} | {m['gemm_ms']:.2f} | {m['gemm_tflops']:.1f} | "
                f"{m['coarse_pass_ms']:.2f} | {m['max_abs_diff2_significant']:.3g} | "
                f"{m['median_abs_diff2_significant']:.3g} | {100 * m['same_best_rotation']:.1f} % |"
            )
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--boxes", type=int, nargs="+", default=[100, 256])
    p.add_argument("--particles", type=int, default=128)
    p.add_argument("--healpix_order", type=int, default=2)
    p.add_argument("--offset_range", type=float, default=5.0)
    p.add_argument("--offset_step", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    result = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit,
        "boxes": [run_box(box, args) for box in args.boxes],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_modes.json").write_text(json.dumps(result, indent=1))
    (out / "precision_modes.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
