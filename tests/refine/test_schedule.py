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


def stalled(order: int) -> Schedule:
    return Schedule(healpix_order=order, offset_range_px=5, offset_step_px=2, iter_without_resolution_gain=1, iter_without_large_changes=1)


def test_sampling_is_fine_enough_below_three_quarters_of_the_accuracy():
    # RELION's updateAngularSampling: HEALPix order 5 samples 1.875°, its fine (oversampled) step is 0.9375°
    sch = stalled(5)
    sch.advance(accuracy_deg=1.3, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0)  # 0.9375 < 0.75 · 1.3 = 0.975: fine enough
    assert sch.converged and sch.healpix_order == 5
    sch = stalled(5)
    sch.advance(accuracy_deg=1.2, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0)  # 0.9375 >= 0.9: one order finer, local searches
    assert not sch.converged and sch.healpix_order == 6 and sch.local_search
    assert abs(sch.sigma_ang_deg - 2 * 0.46875) < 1e-9  # σ = 2 × the new fine step (RELION's updateAngularSampling)
    sch = Schedule(healpix_order=5, offset_range_px=5, offset_step_px=2)  # not stalled: nothing changes
    assert sch.advance(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0) is None and not sch.converged


def test_changes_within_three_percent_of_the_smallest_are_not_large():
    # RELION's updateOverallChangesInHiddenVariables: the counter grows unless a change falls > 3 % below the smallest
    sch = Schedule(healpix_order=3, offset_range_px=1, offset_step_px=0.25)  # fine steps 3.75° and 0.125 px
    sch.update_changes(10, 3.17, 0.41)  # first at this sampling: below the initial 999 → large
    assert sch.iter_without_large_changes == 0
    sch.update_changes(10, 3.10, 0.40)  # 3.10 · 1.03 = 3.19 ≥ 3.17 and 0.40 · 1.03 = 0.412 ≥ 0.41: not large
    assert sch.iter_without_large_changes == 1
    sch.update_changes(10, 3.20, 0.38)  # 0.38 · 1.03 = 0.391 < 0.40 (the smallest now): large
    assert sch.iter_without_large_changes == 0
    assert (sch.smallest_change_orientation_deg, sch.smallest_change_offset_px) == (3.10, 0.38)
    sch.update_changes(10, 3.5, 0.5)
    assert sch.iter_without_large_changes == 1 and sch.iter_without_resolution_gain == 3


def test_changes_below_forty_percent_of_the_sampling_are_not_large():
    # RELION 4/5: 40 % of the fine steps, 1.875° and (per axis) 0.25 px here, make a change small whatever the minimum
    sch = Schedule(healpix_order=4, offset_range_px=2, offset_step_px=0.5)
    sch.update_changes(10, 1.0, 0.5)  # first at this sampling: large
    assert sch.iter_without_large_changes == 0
    sch.update_changes(10, 0.70, 0.14)  # 0.70 < 0.75 and 0.14/√2 = 0.099 < 0.1: small although far below the minima
    assert sch.iter_without_large_changes == 1
    sch.update_changes(10, 0.60, 0.20)  # 0.60 < 0.75; 0.20/√2 = 0.141 ≥ 0.1 but 0.206 ≥ 0.14: small too
    assert sch.iter_without_large_changes == 2
    sch.update_changes(10, 0.8, 0.05)  # 0.8 ≥ 0.75 but 0.824 ≥ 0.6; the offset is below 40 %: not large
    assert sch.iter_without_large_changes == 3
    fresh = Schedule(healpix_order=4, offset_range_px=2, offset_step_px=0.5)
    fresh.update_changes(10, 1.0, 0.5)
    fresh.update_changes(10, 0.9, 0.5)  # 0.9 ≥ 0.75 and 0.927 < 1.0: a large angular change
    assert fresh.iter_without_large_changes == 0


def test_finer_offsets_follow_relions_rule():
    # RELION's updateAngularSampling at 2 Å/px, accuracy 0.6 px = 1.2 Å: step min(1.5, 0.9) · 2 = 1.8 Å = 0.9 px;
    # last rms change 0.2828 px (0.2 px per axis): range 5 · 0.2 = 1.0 px, at least 1.5 · 0.9 = 1.35 px
    sch = stalled(3)
    sch.offset_range_px, sch.offset_step_px, sch.last_change_offset_px = 5.0, 2.0, 0.2 * 2**0.5
    sch.advance(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=0.6, angpix=2.0)
    assert sch.healpix_order == 4
    assert abs(sch.offset_step_px - 0.9) < 1e-9 and abs(sch.offset_range_px - 1.35) < 1e-9
    # a large change: range capped at 1.3 × 1.35, then halved beyond 4 steps? 1.755 < 3.6: kept
    sch = stalled(3)
    sch.offset_range_px, sch.offset_step_px, sch.last_change_offset_px = 1.35, 0.9, 3.0
    sch.advance(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=0.6, angpix=2.0)
    assert abs(sch.offset_range_px - 1.3 * 1.35) < 1e-9 and abs(sch.offset_step_px - 0.9) < 1e-9
    # a coarse accuracy would widen the step (1.5 Å · 2 = 3 Å = 1.5 px > 1 px now): the sampling stays as it is
    sch = stalled(3)
    sch.offset_range_px, sch.offset_step_px, sch.last_change_offset_px = 2.0, 1.0, 0.5
    sch.advance(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=5.0, angpix=2.0)
    assert (sch.offset_range_px, sch.offset_step_px) == (2.0, 1.0)
