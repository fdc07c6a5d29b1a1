"""What a run pays at its first launch of each of its Triton kernels (issue 23's start-up and first iterations): in a
fresh process with CUDA started and Triton's cache key made, each kernel's first and second call on small inputs
(wall seconds, synchronised). Triton compiles a kernel on its first call in a process, or loads it from its on-disk
cache (~/.triton/cache) if an earlier process compiled it: run this twice, the second process shows a run's cost on a
machine that has run before.

usage (device): python bench/triton_first_launch.py [OUT.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # after PYTHONPATH: CRYOREFINE_SRC wins
from cryorefine.estep import coarse_epilogue, fused_local  # noqa: E402
from cryorefine.projection import extract_kernel, insert_kernel, triton_cache_key  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    torch.zeros(1, device=dev)
    cuda_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    triton_cache_key._cache_key()
    key_s = time.perf_counter() - t0
    size, J, n, L = 64, 300, 8, 16
    f = torch.randn(size, size, size // 2 + 1, dtype=torch.complex64, device=dev)
    rot = torch.linalg.qr(torch.randn(n * L, 3, 3, device=dev)).Q.contiguous()
    ky, kx = torch.randint(-10, 10, (J,), device=dev).float(), torch.randint(0, 10, (J,), device=dev).float()
    out = torch.empty(n * L, 2, J, device=dev)
    data = torch.zeros(size, size, size // 2 + 1, dtype=torch.complex64, device=dev)
    weight = torch.zeros(size, size, size // 2 + 1, device=dev)
    vals = torch.randn(n * L, J, dtype=torch.complex64, device=dev)
    wgts = torch.rand(n * L, J, device=dev)
    idx = torch.randint(0, n * L, (n, L), device=dev)
    b = torch.rand(n, J, device=dev)
    transform = type("T", (), {"f_padded": f, "pad": 2})()
    R = 16 * coarse_epilogue.TOPK_BLOCK  # rotations: whole blocks (coarse_epilogue.usable)
    stats = coarse_epilogue.BlockStats.empty(n, 21 * R, dev)
    kernels = {
        "extract": lambda: extract_kernel.extract_fused(f, 2, rot, ky, kx, out),
        "insert quads": lambda: insert_kernel.insert_fused(data, weight, 2, rot, ky, kx, vals, wgts, width=4),
        "insert pairs": lambda: insert_kernel.insert_fused(data, weight, 2, rot, ky, kx, vals, wgts, width=2),
        "local scores T=21": lambda: fused_local.local_scores(
            transform, rot, idx, ky, kx, torch.randn(n, 21, 2 * J, device=dev), b
        ),
        "local scores T=9": lambda: fused_local.local_scores(
            transform, rot, idx, ky, kx, torch.randn(n, 9, 2 * J, device=dev), b
        ),
    }
    cross = torch.randn(n, 21, R, device=dev)
    third, tp = torch.randn(n, R, device=dev), torch.randn(n, 21, device=dev)
    kernels["coarse epilogue"] = lambda: coarse_epilogue.assemble_scores_(cross, third, tp, None, stats, 0)
    result = {"cuda_start_s": round(cuda_s, 4), "triton_key_s": round(key_s, 4), "kernels": {}}
    for name, call in kernels.items():
        first, second = timed(call), timed(call)
        result["kernels"][name] = {"first_s": round(first, 4), "second_s": round(second, 5)}
        print(f"{name:20s} first {first:.4f} s, second {second:.5f} s", flush=True)
    print(f"CUDA start {cuda_s:.3f} s, Triton's cache key {key_s:.3f} s")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
