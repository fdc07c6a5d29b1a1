"""Where the GPU waits: a profiled iteration's device activity (kernels and copies) against its named host ranges
(the timer's stages and host steps), for CRYOREFINE_PROFILE's report (issue 23's "GPU busy" criterion: which part
of an iteration leaves the device idle, and for how long).

Times are microseconds on one clock (the profiler's: it aligns device and host timestamps)."""

from __future__ import annotations

from typing import NamedTuple

Interval = tuple[float, float]


class NamedRange(NamedTuple):
    name: str
    start_us: float
    end_us: float


class HostOp(NamedTuple):
    """An operator the host ran (aten op, CUDA runtime call) on thread ``thread``."""

    name: str
    start_us: float
    end_us: float
    thread: int = 0


def merged(intervals: list[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals (overlapping kernels on several streams count once)."""
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def covered_us(busy: list[Interval], start: float, end: float) -> float:
    """Microseconds of [start, end] inside the merged ``busy`` intervals."""
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in busy)


def idle_gaps(busy: list[Interval], start: float, end: float) -> list[Interval]:
    """The parts of [start, end] outside the merged ``busy`` intervals."""
    gaps, t = [], start
    for s, e in busy:
        if e <= t:
            continue
        if s >= end:
            break
        if s > t:
            gaps.append((t, s))
        t = max(t, e)
    if t < end:
        gaps.append((t, end))
    return gaps


def innermost(ranges: list[NamedRange], t: float) -> str:
    """The name of the shortest range holding time ``t`` ("outside the named ranges" if none does)."""
    holding = [r for r in ranges if r.start_us <= t < r.end_us]
    return min(holding, key=lambda r: r.end_us - r.start_us).name if holding else "outside the named ranges"


def top_level(ops: list[HostOp]) -> list[HostOp]:
    """The operators not inside another one of the same thread (an aten op's own aten ops and runtime calls are
    inside it)."""
    out: list[HostOp] = []
    end_of: dict[int, float] = {}
    for op in sorted(ops, key=lambda o: (o.start_us, -o.end_us)):
        if op.start_us >= end_of.get(op.thread, float("-inf")):
            out.append(op)
            end_of[op.thread] = op.end_us
    return out


def host_during(outer: list[HostOp], start: float, end: float, top: int = 3) -> str:
    """What one host thread did in [start, end], given its outermost operators ``outer`` (top_level): their time there
    by name (the ``top`` longest), and the rest, time in Python between operators (where a GPU waits for the host to
    queue work)."""
    spent: dict[str, float] = {}
    for op in outer:
        t = min(op.end_us, end) - max(op.start_us, start)
        if t > 0:
            spent[op.name] = spent.get(op.name, 0.0) + t
    listed = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    words = [f"{name} {t / 1e3:.1f} ms" for name, t in listed]
    words.append(f"between operators {(end - start - sum(spent.values())) / 1e3:.1f} ms")
    return "host: " + ", ".join(words)


def idle_report(
    device: list[Interval],
    ranges: list[NamedRange],
    start: float,
    end: float,
    top: int = 8,
    host_ops: list[HostOp] | None = None,
    main_thread: int = 0,
) -> str:
    """Text: the device's busy share of [start, end], its idle time per named range (each gap charged to the
    innermost range at its start) and the ``top`` longest gaps, each with what ``main_thread`` (the one that queues the
    device's work) did meanwhile, given the host's operators ``host_ops``."""
    busy = merged(device)
    wall = max(end - start, 1e-9)
    gaps = idle_gaps(busy, start, end)
    by_range: dict[str, float] = {}
    for s, e in gaps:
        name = innermost(ranges, s)
        by_range[name] = by_range.get(name, 0.0) + (e - s)
    lines = [
        f"device busy {covered_us(busy, start, end) / wall:.1%} of {wall / 1e6:.3f} s "
        f"(kernels and copies, merged over streams); idle {sum(e - s for s, e in gaps) / 1e6:.3f} s:"
    ]
    lines += [f"  idle in {n}: {t / 1e6:.3f} s" for n, t in sorted(by_range.items(), key=lambda kv: -kv[1])]
    lines.append("longest gaps (s, at s from the start, in):")
    outer = None if host_ops is None else top_level([o for o in host_ops if o.thread == main_thread])  # once
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        host = "" if outer is None else "; " + host_during(outer, s, e)
        lines.append(f"  {(e - s) / 1e6:.4f} at {(s - start) / 1e6:.3f} in {innermost(ranges, s)}{host}")
    return "\n".join(lines)
