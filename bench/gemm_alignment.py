"""The coarse pass's product a (M, K) · b (N, K)ᵀ (estep/precision.matmul_nt's layout) on the GPU at inner sizes K
around a run's, in TF32 and fp32: whether an inner size whose rows are not a multiple of 16 bytes (K = 2·jc, jc odd:
2102 at betagal-like's order-3 window) keeps cuBLAS off the card's fastest kernels, and what padding K costs.

usage: python bench/gemm_alignment.py OUT.json [--m 18944] [--n 36864] [--ks 2102,2104,2112,2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed_product(m: int, n: int, k: int, tf32: bool, repeats: int) -> float:
    """Median seconds of one a @ b.T (CUDA events), after two warm-up products."""
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(n, k, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for _ in range(2):
        a @ b.T
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b.T
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--m", type=int, default=18944)
    ap.add_argument("--n", type=int, default=36864)
    ap.add_argument("--ks", default="2102,2104,2112,2048")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    rows = []
    for k in (int(x) for x in a.ks.split(",")):
        for tf32 in (True, False):
            s = timed_product(a.m, a.n, k, tf32, a.repeats)
            rows.append({"k": k, "tf32": tf32, "seconds": s, "tflops": 2.0 * a.m * a.n * k / s / 1e12})
            mode = "tf32" if tf32 else "fp32"
            print(f"K {k:5d} {mode}: {1e3 * s:7.2f} ms, {rows[-1]['tflops']:6.1f} TFLOP/s", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with open(a.out, "w") as f:
        json.dump({**meta, "m": a.m, "n": a.n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
