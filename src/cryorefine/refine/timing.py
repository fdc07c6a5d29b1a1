"""Wall time per stage (the paper's getFourier / getAll / convertAll / storeWeighted / M-step breakdown).

Besides the stages (``seconds``, the same keys every iteration), a timer keeps the wall time of host-only steps between
the stages (``host(name)``: planning, waiting for the last iteration's files; the GPU has nothing queued then), and
counters for the benchmarks,
reset by ``reset_counters()``: ``substage(name)`` times a part of a stage without adding to ``seconds`` (the coarse
pass of getAllSquaredDifferences), ``add_flops(name, flops, shapes)`` counts the floating-point operations of
matrix products with the shapes they ran at (to time cuBLAS on the same shapes), and ``add_bytes(name, nbytes)`` the
device memory a memory-bound stage must read or write at least once (its achieved GB/s against the card's).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from ..debug_hooks import profile_request
from .device_idle import HostOp, NamedRange, idle_report


ALLOCATOR_EVENTS = {"cudaMalloc": "num_device_alloc", "cudaFree": "num_device_free", "retries": "num_alloc_retries"}


class StageTimer:
    """On a GPU a stage is timed by CUDA events on the current stream, read at the end of the iteration: timing does
    not synchronise the device, so the host can queue the next kernels while the GPU works (a stage's time is the
    stream's span from its start to its end: GPU time where the host runs ahead, wall time where the GPU waits)."""

    def __init__(self, device=None):
        self._seconds = defaultdict(float)
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.device = torch.device(device) if self.cuda else None
        self._allocator_before: dict[str, int] = {}
        self._sub_seconds = defaultdict(float)
        self._host_seconds: defaultdict[str, float] = defaultdict(float)
        self._events: list[tuple[dict, str, torch.cuda.Event, torch.cuda.Event]] = []
        self.flops = defaultdict(float)
        self.shapes = defaultdict(Counter)
        self.bytes = defaultdict(float)
        self._first_batch_seen = False
        self._startup_s: float | None = None

    def first_batch(self) -> None:
        """Called as each E-step batch begins: the first call of the process notes the seconds since the process
        started (imports, device start, inputs read, the first plan; issue 23's start-up), for take_startup."""
        if not self._first_batch_seen:
            self._first_batch_seen = True
            self._startup_s = seconds_since_process_start()

    def take_startup(self) -> float | None:
        """The start-up first_batch noted (None if not noted, or taken already: only the process's first iteration
        has one)."""
        out, self._startup_s = self._startup_s, None
        return out

    def _resolve(self) -> None:
        """Add the spans of the recorded CUDA events (waits for the last one)."""
        if self._events:
            self._events[-1][3].synchronize()
            for into, name, start, end in self._events:
                into[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()

    @property
    def seconds(self) -> dict:
        self._resolve()
        return self._seconds

    @property
    def sub_seconds(self) -> dict:
        self._resolve()
        return self._sub_seconds

    @contextmanager
    def _timed(self, into: dict, name: str):
        """Add the time of the block to ``into[name]``: CUDA events on a GPU, else the wall time."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(name):  # named ranges in a CRYOREFINE_PROFILE trace
                yield
        finally:
            if self.cuda:
                end.record()
                self._events.append((into, name, start, end))
            else:
                into[name] += time.perf_counter() - t0

    def __call__(self, name: str):
        return self._timed(self._seconds, name)

    @contextmanager
    def host(self, name: str):
        """Add the wall time of the block to the host-only steps (``reset_host``), on every device."""
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            self._host_seconds[name] += time.perf_counter() - t0

    def reset_host(self) -> dict:
        """{name: seconds} of the host-only steps since the last call, then cleared."""
        out = dict(self._host_seconds)
        self._host_seconds.clear()
        return out

    def substage(self, name: str):
        """Time a part of a stage into ``sub_seconds``; the stage's own time is unchanged."""
        return self._timed(self._sub_seconds, name)

    def add_flops(self, name: str, flops: float, shapes=()) -> None:
        """Count ``flops`` under ``name``; ``shapes``: (key, count) pairs, key like 'mm:MxKxN' or 'bmm:BxMxKxN'."""
        self.flops[name] += float(flops)
        for key, count in shapes:
            self.shapes[name][key] += int(count)

    def add_bytes(self, name: str, nbytes: float) -> None:
        """Count ``nbytes`` of device memory traffic under ``name``."""
        self.bytes[name] += float(nbytes)

    def reset(self) -> dict:
        out = dict(self.seconds)
        self._seconds.clear()
        return out

    def reset_allocator(self) -> dict:
        """{event: count} of the CUDA caching allocator since the last call, those that happened: cudaMalloc and
        cudaFree calls, and retries (an allocation that failed, released the cache, synchronising the device, and
        tried again). Each costs milliseconds of host time with the GPU idle; {} on the CPU."""
        if not self.cuda:
            return {}
        stats = torch.cuda.memory_stats(self.device)
        now = {name: int(stats.get(key, 0)) for name, key in ALLOCATOR_EVENTS.items()}
        out = {name: n - self._allocator_before.get(name, 0) for name, n in now.items()}
        self._allocator_before = now
        return {name: n for name, n in out.items() if n}

    def reset_counters(self) -> dict:
        """{name: {'seconds', 'flops', 'shapes': {key: calls}, 'bytes'}} since the last call, then cleared."""
        sub = self.sub_seconds
        names = set(sub) | set(self.flops) | set(self.bytes)
        out = {
            n: {
                "seconds": sub.get(n, 0.0),
                "flops": self.flops.get(n, 0.0),
                "shapes": dict(self.shapes.get(n, {})),
                "bytes": self.bytes.get(n, 0.0),
            }
            for n in sorted(names)
        }
        sub.clear()
        self.flops.clear()
        self.shapes.clear()
        self.bytes.clear()
        return out


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started, from Linux's /proc (10 ms resolution); None where it cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def profiled(iteration: int, final: bool = False):
    """Run the block under torch.profiler when CRYOREFINE_PROFILE names this iteration (a benchmark hook, e.g.
    CRYOREFINE_PROFILE=8,final CRYOREFINE_PROFILE_OUT=prof.txt; "final": auto-refine's last, joined iteration);
    writes the operators sorted by device and by host time, or with CRYOREFINE_PROFILE_MODE=python the Python
    functions (cProfile) by cumulative and own time, and what the functions CRYOREFINE_PROFILE_FOCUS names call, or
    with CRYOREFINE_PROFILE_MODE=waits where the host waited for the device (host_waits)."""
    request = profile_request()
    if not request.wants(iteration, final):
        yield
        return
    path = request.out or f"profile_it{iteration:03d}.txt"
    if request.mode == "python":  # host view: where the wall time of the Python goes
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
        text = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(45)
        for name in request.focus:  # e.g. maximization
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_callees(name)
        with open(path, "a") as fh:
            fh.write(f"# iteration {iteration} (cProfile)\n" + text.getvalue())
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    if request.mode == "waits":
        sites: Counter = Counter()
        with profile(activities=acts, with_stack=True) as prof, sync_sites(sites):
            yield
        with open(path, "a") as fh:
            fh.write(
                f"# iteration {iteration}: where the host waited for the device\n{host_waits(prof.events())}\n"
                f"synchronising calls PyTorch reported, by call site:\n{format_sites(sites)}\n"
            )
        return
    with profile(activities=acts, record_shapes=True) as prof:
        yield
    ka = prof.key_averages(group_by_input_shape=False)
    lines = [f"# iteration {iteration}"]
    if torch.cuda.is_available():
        lines.append(_device_idle(prof))
        lines.append(ka.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=60))
    lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    lines.append(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
            row_limit=25,
            max_name_column_width=40,
            max_shapes_column_width=80,
        )
    )
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")


@contextmanager
def sync_sites(sites: Counter, frames: int = 4):
    """Count the synchronising calls PyTorch reports in the block (torch.cuda.set_sync_debug_mode("warn"): reads of
    device values, copies that wait) by their innermost ``frames`` cryorefine call sites, into ``sites``."""
    import traceback
    import warnings

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack() if "cryorefine" in f.filename and "timing.py" not in f.filename]
        where = tuple(f"{f.filename.split('cryorefine/')[-1]}:{f.lineno} {f.name}" for f in stack[-frames:])
        sites[(str(message).splitlines()[0][:60], where)] += 1

    before = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if before is not None:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if before is not None:
                torch.cuda.set_sync_debug_mode(before)


def format_sites(sites: Counter, top: int = 40) -> str:
    """sync_sites's counts, most first: count, message, call sites (innermost last)."""
    return "\n".join(f"{n:6d}  {msg}  " + " > ".join(where) for (msg, where), n in sites.most_common(top))


# CUDA runtime calls in which the host can wait for the device (a copy to or from pageable memory waits too)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def host_waits(events, frames: int = 4, top: int = 40) -> str:
    """The waiting calls (WAITS) of a torch.profiler run (with_stack) grouped by the operator that made them and the
    cryorefine frames it was called from (the ``frames`` innermost Python functions among its parents), most host time
    first: each group's calls, total ms and call site."""
    groups: dict[tuple, list] = {}
    for e in events:
        if e.name not in WAITS:
            continue
        op, stack, p = "-", list[str](), e.cpu_parent
        while p is not None:
            if op == "-" and p.name.startswith(("aten::", "<built-in method")):  # the operator, or the Tensor method
                op = p.name.split(" of ")[0].removeprefix("<built-in method ")
            elif "cryorefine" in p.name and len(stack) < frames:  # a Python frame: "path/file.py(line): function"
                stack.append(p.name.split("cryorefine/")[-1])
            p = p.cpu_parent
        g = groups.setdefault((op, tuple(stack)), [0, 0.0])
        g[0] += 1
        g[1] += e.cpu_time_total / 1e3
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    lines = [f"{sum(g[0] for _, g in rows)} waiting calls, {sum(g[1] for _, g in rows):.1f} ms"]
    for (name, stack), (count, ms) in rows[:top]:
        lines.append(f"{count:6d} {ms:9.1f} ms  {name}  " + " < ".join(stack))
    return "\n".join(lines)


def _device_idle(prof) -> str:
    """device_idle's report of a torch.profiler run: its CUDA kernels, copies and sets against the named ranges."""
    from torch.autograd import DeviceType

    events = prof.profiler.kineto_results.events()
    on_device = [e for e in events if e.device_type() == DeviceType.CUDA and not e.is_user_annotation()]
    ranges = [
        NamedRange(e.name(), e.start_ns() / 1e3, e.end_ns() / 1e3)
        for e in events
        if e.device_type() == DeviceType.CPU and e.is_user_annotation()
    ]
    host = [
        HostOp(e.name(), e.start_ns() / 1e3, e.end_ns() / 1e3, e.start_thread_id())
        for e in events
        if e.device_type() == DeviceType.CPU and not e.is_user_annotation()
    ]
    # the thread that queues the device's work: the one that ran the named stages
    threads = [e.start_thread_id() for e in events if e.device_type() == DeviceType.CPU and e.is_user_annotation()]
    main = max(set(threads), key=threads.count) if threads else 0
    start = min(e.start_ns() for e in events) / 1e3
    end = max(e.end_ns() for e in events) / 1e3
    device = [(e.start_ns() / 1e3, e.end_ns() / 1e3) for e in on_device]
    return idle_report(device, ranges, start, end, host_ops=host, main_thread=main)
