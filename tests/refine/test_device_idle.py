"""device_idle: the GPU's idle time of a profiled iteration, charged to the named host ranges, against hand-counted
timelines."""

from cryorefine.refine.device_idle import NamedRange, covered_us, idle_gaps, idle_report, innermost, merged


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
