"""device_idle: the GPU's idle time of a profiled iteration, charged to the named host ranges, against hand-counted
timelines."""

from cryorefine.refine.device_idle import (
    HostOp,
    NamedRange,
    covered_us,
    host_during,
    idle_gaps,
    idle_report,
    innermost,
    merged,
    top_level,
)


def test_overlapping_kernels_count_once():
    assert merged([(5, 8), (0, 2), (1, 3), (7, 9), (10, 11)]) == [(0, 3), (5, 9), (10, 11)]
    assert covered_us(merged([(0, 2), (1, 3), (5, 9)]), 2, 6) == 2  # 2..3 and 5..6


def test_gaps_are_the_window_outside_the_kernels():
    busy = merged([(2, 4), (6, 7)])
    assert idle_gaps(busy, 0, 10) == [(0, 2), (4, 6), (7, 10)]
    assert idle_gaps(busy, 3, 6.5) == [(4, 6)]
    assert idle_gaps([], 1, 2) == [(1, 2)]


def test_a_gap_is_charged_to_the_innermost_range():
    ranges = [NamedRange("M-step", 0, 100), NamedRange("plan", 100, 150), NamedRange("reconstruct", 10, 20)]
    assert innermost(ranges, 15) == "reconstruct" and innermost(ranges, 50) == "M-step"
    assert innermost(ranges, 120) == "plan" and innermost(ranges, 200) == "outside the named ranges"


def test_report_figures():
    # 1 s window: kernels busy 0.1-0.5 s and 0.6-0.7 s; the plan range holds the first idle 0.1 s
    us = 1e6
    text = idle_report(
        [(0.1 * us, 0.3 * us), (0.2 * us, 0.5 * us), (0.6 * us, 0.7 * us)],
        [NamedRange("plan", 0, 0.1 * us), NamedRange("M-step", 0.5 * us, us)],
        0,
        us,
    )
    assert "device busy 50.0% of 1.000 s" in text and "idle 0.500 s" in text
    assert "idle in M-step: 0.400 s" in text and "idle in plan: 0.100 s" in text
    assert text.splitlines()[-3].strip() == "0.3000 at 0.700 in M-step"  # the longest gap first


def test_only_the_outermost_operators_of_a_thread_count():
    ops = [
        HostOp("aten::to", 0, 10, 1),
        HostOp("aten::copy_", 2, 9, 1),  # inside aten::to
        HostOp("cudaMemcpyAsync", 3, 8, 1),
        HostOp("aten::mm", 12, 15, 1),
        HostOp("aten::copy_", 4, 6, 2),  # another thread: its own outermost
    ]
    assert [(o.name, o.thread) for o in top_level(ops)] == [("aten::to", 1), ("aten::copy_", 2), ("aten::mm", 1)]


def test_host_during_a_gap_names_its_operators_and_the_python_between():
    ops = [HostOp("aten::item", 0, 1500, 7), HostOp("aten::index", 4000, 6000, 7), HostOp("aten::copy_", 0, 9000, 8)]
    # gap 1000..9000 us: item's last 0.5 ms, index 2 ms, the rest (5.5 ms) between operators; thread 8 not counted
    assert host_during(top_level([o for o in ops if o.thread == 7]), 1000, 9000) == (
        "host: aten::index 2.0 ms, aten::item 0.5 ms, between operators 5.5 ms"
    )


def test_each_long_gap_says_what_the_host_did():
    us = 1e6
    text = idle_report(
        [(0.0, 0.5 * us)], [], 0, us, host_ops=[HostOp("aten::nonzero", 0.6 * us, 0.7 * us, 3)], main_thread=3
    )
    assert text.splitlines()[-1].strip() == (
        "0.5000 at 0.500 in outside the named ranges; host: aten::nonzero 100.0 ms, between operators 400.0 ms"
    )


def test_a_cpu_profile_reads_the_host_operators():
    """The profiler's own events (on the CPU: no device activity, so the whole window is one gap)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cryorefine.refine.timing import StageTimer, _device_idle

    timer = StageTimer()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with timer("stage"):
            x = torch.randn(300, 300, dtype=torch.float64)
            for _ in range(3):
                x = x @ x / 300.0
    text = _device_idle(prof)
    assert "device busy 0.0%" in text and "idle in stage" in text
    host = text.splitlines()[-1].split("host: ")[1]  # the three top-level operators, longest first (timing-dependent)
    assert ("aten::matmul" in host or "aten::mm" in host) and "aten::randn" in host and "between operators" in host


def test_host_waits_names_the_call_site_of_each_wait(monkeypatch):
    """timing.host_waits on a real profiler trace (CPU: an operator stands in for the CUDA runtime's waiting calls):
    three calls of slots.class_bounds are one group, named by its operator and function."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cryorefine.estep.slots import class_bounds
    from cryorefine.refine import timing

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(3):
            class_bounds(torch.tensor([0, 0, 1, 2]), 3)
    monkeypatch.setattr(timing, "WAITS", ("aten::searchsorted",))
    report = timing.host_waits(prof.events()).splitlines()
    assert report[0].startswith("3 waiting calls")
    assert report[1].split()[0] == "3" and "estep/slots.py" in report[1] and "class_bounds" in report[1]


def test_sync_sites_counts_each_warning_by_its_call_site():
    """timing.sync_sites: the warnings issued in the block (on a GPU PyTorch's sync debug mode issues one per
    synchronising call) counted by message and cryorefine call site; none escapes the block."""
    import warnings
    from collections import Counter

    from cryorefine.refine import timing

    sites: Counter = Counter()
    with timing.sync_sites(sites):
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    assert sorted(sites.values()) == [1, 3]
    assert "3  called a synchronizing CUDA operation" in timing.format_sites(sites)
