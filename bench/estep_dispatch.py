"""Issue 23's host-side view of the E-step: how many PyTorch calls a batch dispatches and how many of them make the host
wait for the device (a read of a device value), per batch of a small auto-refine, global and local searches.

On a GPU each call costs the host of the order of 10 µs (Python, dispatch, launch) whatever its size, and a read
waits until the device has finished everything queued before it (the device then idles until the host queues more):
with small kernels these, more than the arithmetic, can set the pace. The counts come from a
torch.overrides.TorchFunctionMode over the E-step passes (steps.run_expectation), cut into batches at each
expectation_batch call (a batch: its images' preparation, its E-step and its results to the host). The shared code
counts the same on any device (the CPU has compiled loops where CUDA has Triton kernels, one call each), so the counts
are taken on the CPU and tracked from commit to commit. Reads counted (not in the CPU's own loops, whose tensors live
on the host): .item()/int()/float()/bool() of a tensor, .cpu(), .tolist(), nonzero, unique, bincount,
masked_select, argwhere, repeat_interleave by a tensor of counts, and indexing by a boolean mask (.numpy() of a
device tensor needs .cpu() first: not counted twice).

The set: tests/small_set.small_set (box 64, 3 Å/px, 400 particles, SNR 0.5), particles_noposes.star, auto-refine
with HEALPix order 2 and local searches from order 2, batches of 200. Results in OUTDIR/estep_dispatch.{json,md}.

With --gpu the run is on CUDA and CUDA's own count is added: torch.cuda.set_sync_debug_mode("warn") warns at every
call that synchronises the device (reads, and copies from pageable host memory), counted per batch.

usage: python bench/estep_dispatch.py OUTDIR [--work /tmp/estep_dispatch] [--iterations 6] [--gpu]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

READS = {"item", "cpu", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "unique"}
READS |= {"unique_consecutive", "bincount", "masked_select", "argwhere"}
# host tensors by construction (the CPU's compiled loops, numpy-in numpy-out helpers): not reads on a GPU
HOST_ONLY = ("projection/cpu_kernels.py:", "estep/cpu_scores.py:", "geometry/healpix.py:perturb_eulers")


def _is_read(name: str, args) -> bool:
    """Whether the call waits for the device's values (see the module's docstring)."""
    if name in READS:
        return True
    if name == "repeat_interleave":
        return len(args) > 1 and isinstance(args[1], torch.Tensor)
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class DispatchCounter(TorchFunctionMode):
    """Counts torch calls and device reads while ``on``, by the innermost cryorefine function that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.calls = 0
        self.reads = 0
        self.call_sites: collections.Counter = collections.Counter()
        self.read_sites: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.on:
            name = getattr(func, "__name__", str(func))
            site = next(
                (
                    f"{f.filename.split('src/cryorefine/')[-1]}:{f.name}"
                    for f in reversed(traceback.extract_stack(limit=10)[:-1])
                    if "src/cryorefine/" in f.filename
                ),
                "?",
            )
            self.calls += 1
            self.call_sites[site] += 1
            if _is_read(name, args) and not site.startswith(HOST_ONLY):
                self.reads += 1
                self.read_sites[f"{site} ({name})"] += 1
        return func(*args, **(kwargs or {}))


def _syncs(caught: list) -> int:
    """How many recorded warning messages are CUDA's "synchronizing operation" ones (torch.cuda.set_sync_debug_mode)."""
    return sum("synchroniz" in str(message) for message in caught)


def main(cmdline=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--work", default="/tmp/estep_dispatch")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(cmdline)
    from small_set import small_run_flags, small_set

    import cryorefine.refine.engine as engine
    import cryorefine.refine.steps as steps
    from cryorefine.cli.main import main as cli

    work, out = Path(a.work), Path(a.outdir)
    data = work / "data"
    if not (data / "particles_noposes.star").exists():
        data.mkdir(parents=True, exist_ok=True)
        small_set(data, 64, 3.0, 400, 1)
    counter, batches, caught = DispatchCounter(), [], []
    run_expectation, expectation_batch = steps.run_expectation, engine.expectation_batch

    def close() -> None:  # the batch since the last expectation_batch call: its preparation, E-step and results
        if batches and "calls" not in batches[-1]:
            b = batches[-1]
            b["calls"], b["reads"] = counter.calls - b.pop("calls0"), counter.reads - b.pop("reads0")
            b["cuda_syncs"] = _syncs(caught) - b.pop("syncs0")

    def batch_counted(batch, *args, **kwargs):
        close()
        batches.append({"particles": len(batch), "local": args[6] is not None,  # expectation_batch's local_prior
                        "calls0": counter.calls, "reads0": counter.reads, "syncs0": _syncs(caught)})  # fmt: skip
        return expectation_batch(batch, *args, **kwargs)

    def pass_counted(*args, **kwargs):
        counter.on = True
        # the warnings recorded here, inside the command's own recorder (cli.main holds a run's warnings and shows
        # them at its end: one outside it never saw CUDA's)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest, **kw: caught.append(message)
            try:
                return run_expectation(*args, **kwargs)
            finally:
                close()
                counter.on = False

    steps.run_expectation, engine.expectation_batch = pass_counted, batch_counted
    argv = ["refine", *small_run_flags(data, work / "run"), "--auto_refine", "--split_random_halves"]
    argv += ["--healpix_order", "2", "--auto_local_healpix_order", "2", "--auto_iter_max", str(a.iterations)]
    argv += ["--batch", "200", "--random_seed", "0"] + (["--gpu"] if a.gpu else ["--j", "2"])
    shutil.rmtree(work / "run", ignore_errors=True)
    t0 = time.perf_counter()
    with counter:
        if a.gpu:  # CUDA's own count: torch warns at every call that synchronises the device
            torch.cuda.set_sync_debug_mode("warn")
        rc = cli(argv)
        if a.gpu:
            torch.cuda.set_sync_debug_mode("default")
    steps.run_expectation, engine.expectation_batch = run_expectation, expectation_batch
    if rc != 0:
        return rc

    def mean(local: bool, key: str) -> float | None:
        v = [b[key] for b in batches if b["local"] == local]
        return round(sum(v) / len(v), 1) if v else None

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip() + (" (uncommitted changes in src)" if dirty.stdout.strip() else ""),
        "device": torch.cuda.get_device_name(0) if a.gpu else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "command": "python bench/estep_dispatch.py " + " ".join(sys.argv[1:] if cmdline is None else cmdline),
        "run_seconds": round(time.perf_counter() - t0, 1),
        "batches": batches,
        "mean_calls_global": mean(False, "calls"),
        "mean_reads_global": mean(False, "reads"),
        "mean_calls_local": mean(True, "calls"),
        "mean_reads_local": mean(True, "reads"),
        "mean_cuda_syncs_global": mean(False, "cuda_syncs") if a.gpu else None,
        "mean_cuda_syncs_local": mean(True, "cuda_syncs") if a.gpu else None,
        "call_sites": dict(counter.call_sites.most_common(25)),
        "read_sites": dict(counter.read_sites.most_common()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "estep_dispatch.json").write_text(json.dumps(result, indent=1))
    (out / "estep_dispatch.md").write_text(render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    n = len(r["batches"])
    lines = [
        "# E-step dispatch: PyTorch calls and device reads per batch",
        "",
        f"- Date {r['date']}; commit {r['commit']}; {r['device']}; torch {r['torch']}.",
        f"- `{r['command']}` ({n} batches of a 400-particle auto-refine, box 64; {r['run_seconds']} s).",
        "",
        "| batches | calls per batch (mean) | reads per batch (mean) | CUDA's synchronising calls per batch (mean) |",
        "|---|---|---|---|",
        f"| global searches | {r['mean_calls_global']} | {r['mean_reads_global']} | {r['mean_cuda_syncs_global']} |",
        f"| local searches | {r['mean_calls_local']} | {r['mean_reads_local']} | {r['mean_cuda_syncs_local']} |",
        "",
        "## Device reads by site (all batches)",
        "",
        "| site (call) | reads |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in r["read_sites"].items()),
        "",
        "## PyTorch calls by site (all batches, the 25 largest)",
        "",
        "| site | calls |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in r["call_sites"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
