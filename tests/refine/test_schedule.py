"""E-step windows of the schedule against hand-computed shells."""

from cryorefine.refine.schedule import Schedule, strict_window_shell


def test_strict_highres_caps_the_window_at_relions_shell():
    # box 64 at 3 Å/px: 10 Å is shell 64·3/10 = 19.2 → 19; 7 Å → 27.4 → 27
    assert strict_window_shell(32, 64, 3.0, 10.0) == 19
    assert strict_window_shell(25, 64, 3.0, 7.0) == 25  # the window is already inside the limit
    assert strict_window_shell(32, 64, 3.0, 7.0) == 27
    assert strict_window_shell(32, 64, 3.0, 0.0) == 32  # 0 = no limit
    assert strict_window_shell(32, 64, 3.0, 100.0) == 5  # never below the first regularised shell


def test_coarse_shell_is_never_beyond_the_window():
    sch = Schedule(healpix_order=1, offset_range_px=5, offset_step_px=2)
    capped = strict_window_shell(32, 64, 3.0, 10.0)
    assert sch.coarse_shell(capped, 64, 3.0, 170.0) <= capped
