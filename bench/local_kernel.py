"""The fused local-search coarse kernel (estep/fused_local.py) on its own, on a GPU: time, interpolations/s and
counted TFLOP/s per block shape (candidates × pixels per step, warps: fused_local.BLOCKS_FEW_TRANSLATIONS and
BLOCKS_MANY_TRANSLATIONS, both set to each shape in turn), on the shapes of a box-256 local search (issue 23: the
TRPV1-like set's local iterations spent most of getAllSquaredDifferences here, at 0.55-0.67 TFLOP/s, before the blocks
were chosen with this script).

Random map (box 256, pad 2, the grid windowed to the radius as the E-step stores it), n particles each with L
candidate rotations within a few degrees of its own, T translations, the pixels of the half plane inside the radius.
Times: the median of 5 CUDA-event-timed calls after two warm-ups (precision_modes.cuda_ms; NaN in a dry run on the CPU
under TRITON_INTERPRET=1). Errors: max |Δ| / max |x| against the float64 PyTorch path (diff2.local_scores_gathered) on
the first particles.

Candidates: ``--candidates random`` draws L rotations within a few degrees of each particle's; ``local:ORDER`` takes
those of a local search on the HEALPix grid of ORDER (PoseGrid.local_candidates, σ the next order's step, as
auto-refine's: ~22 per particle, padded to the batch's largest set), the L of --TL then ignored. Pixels: ``shell``, the
E-step window's order (by shell, raster within one), or ``raster``. ``--counts`` passes each particle's valid candidates
to the kernel (its padding not interpolated), else every slot is scored.

usage (device): python bench/local_kernel.py OUT.json [--n 1024] [--box 256] [--radius 80] [--TL 9x192,21x128]
                  [--sweep 'CANDIDATES;PIXELS;WARPS'] [--candidates random|local:ORDER] [--pixels shell|raster]
                  [--counts]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cryorefine.estep import fused_local  # noqa: E402
from cryorefine.estep.diff2 import local_scores_gathered  # noqa: E402
from cryorefine.estep.images import Window  # noqa: E402
from cryorefine.estep.poses import PoseGrid  # noqa: E402
from cryorefine.geometry.healpix import angular_step_deg, make_sampling  # noqa: E402
from cryorefine.geometry.euler import euler_to_matrix  # noqa: E402
from cryorefine.projection.extract import prepare_padded_transform, window_grid_size  # noqa: E402
from precision_modes import cuda_ms  # noqa: E402  (bench/: the script's folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--radius", type=int, default=80)
    ap.add_argument("--TL", default="9x192,21x128")
    ap.add_argument("--check", type=int, default=8, help="particles checked against the float64 reference")
    ap.add_argument("--sweep", default="16,32,64;32,64;2,4,8", help="candidates;pixels;warps lists")
    ap.add_argument("--candidates", default="random", help="random, or local:ORDER (a local search's)")
    ap.add_argument("--pixels", default="raster", choices=["raster", "shell"])
    ap.add_argument("--counts", action="store_true", help="pass the valid candidates per particle")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    pad, box = 2, args.box
    vol = torch.randn(box, box, box, device=dev)
    ref = prepare_padded_transform(vol, pad, window_grid_size(args.radius, box, pad))
    ref64 = prepare_padded_transform(vol.double(), pad, window_grid_size(args.radius, box, pad))
    if args.pixels == "shell":
        window = Window.build(box, args.radius - 1, dev)
        ky, kx = window.ky, window.kx
    else:
        ky, kx = torch.meshgrid(
            torch.arange(-args.radius, args.radius + 1, device=dev, dtype=torch.float32),
            torch.arange(0, args.radius + 1, device=dev, dtype=torch.float32),
            indexing="ij",
        )
        keep = ky**2 + kx**2 < args.radius**2
        ky, kx = ky[keep], kx[keep]
    jc, rows = ky.numel(), []
    for tl_ in args.TL.split(","):
        T, L = (int(x) for x in tl_.split("x"))
        n = args.n
        counts = None
        if args.candidates.startswith("local:"):
            order = int(args.candidates.split(":")[1])
            grid = PoseGrid.build(make_sampling(order, "C1", 0.3), 1.0, 0.5, dev)
            gen = torch.Generator().manual_seed(0)
            rot, psi = (torch.rand(n, generator=gen).numpy() * 360.0 - 180.0 for _ in range(2))
            tilt = torch.rad2deg(torch.arccos(torch.rand(n, generator=gen) * 2.0 - 1.0)).numpy()
            ids, _, valid = grid.local_candidates(rot, tilt, psi, angular_step_deg(order + 1))
            L = ids.shape[1]
            R = grid.rotations(ids.reshape(-1))
            counts = valid.sum(1) if args.counts else None
        else:
            base = torch.rand(n, 1, 3, device=dev) * torch.tensor([360.0, 180.0, 360.0], device=dev)
            eul = (base + 3.0 * torch.randn(n, L, 3, device=dev)).reshape(-1, 3)
            R = euler_to_matrix(eul[:, 0], eul[:, 1], eul[:, 2]).float()
        idx = torch.arange(n * L, device=dev).reshape(n, L)
        a = torch.randn(n, T, 2 * jc, device=dev)
        b = torch.rand(n, jc, device=dev)
        check = slice(0, min(n, args.check))  # a float64 reference for the first particles
        ref_out = local_scores_gathered(
            ref64, R.double(), idx[check], ky.double(), kx.double(), a[check].double(), b[check].double()
        )
        if counts is not None:  # the padding scores 0 in the kernel
            pad_ = torch.arange(L, device=dev)[None, :] >= counts[check, None]
            ref_out = (ref_out[0].masked_fill(pad_[:, None, :], 0.0), ref_out[1].masked_fill(pad_, 0.0))
        defaults = (fused_local.BLOCKS_FEW_TRANSLATIONS, fused_local.BLOCKS_MANY_TRANSLATIONS)
        for bl, bj, nw in itertools.product(*(tuple(int(v) for v in x.split(",")) for x in args.sweep.split(";"))):
            fused_local.BLOCKS_FEW_TRANSLATIONS = fused_local.BLOCKS_MANY_TRANSLATIONS = (bl, bj, nw)
            try:
                out = fused_local.local_scores(ref, R, idx, ky, kx, a, b, counts=counts)
                t = cuda_ms(lambda: fused_local.local_scores(ref, R, idx, ky, kx, a, b, counts=counts), 5) / 1e3
            except Exception as exc:  # noqa: BLE001 - a block shape that does not compile is a result too
                print(f"T={T} L={L} blocks {bl}x{bj} warps {nw}: failed: {exc!s:.200}")
                continue
            finally:
                fused_local.BLOCKS_FEW_TRANSLATIONS, fused_local.BLOCKS_MANY_TRANSLATIONS = defaults
            err = [float((o[check].double() - r).abs().max() / r.abs().max()) for o, r in zip(out, ref_out)]
            flops = n * (2.0 * T * 2 * jc * L + 2.0 * jc * L)
            row = {
                "candidates": args.candidates,
                "pixels": args.pixels,
                "counts": args.counts,
                "T": T,
                "L": L,
                "n": n,
                "jc": jc,
                "block_l": bl,
                "block_j": bj,
                "warps": nw,
                "ms": round(t * 1e3, 3),
                "tflops": round(flops / t / 1e12, 3),
                "ginterp_s": round(n * L * jc / t / 1e9, 2),
                "err_cross": err[0],
                "err_third": err[1],
            }
            rows.append(row)
            print(json.dumps(row))
    meta = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (TRITON_INTERPRET)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "grid": list(ref.f_padded.shape),
        "argv": sys.argv,
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
