"""RELION's auto-refine schedule (MlOptimiser's counters, windows and sampling rules in ml_optimiser.cpp and
ml_optimiser_mpi.cpp, 3.1.3) against hand-computed cases."""

import numpy as np
import torch

from cryorefine.geometry.euler import euler_to_matrix, matrix_to_euler
from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.refine.engine import angular_change_deg
from cryorefine.mstep.maximize import resolution_from_data_vs_prior
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
    return Schedule(
        healpix_order=order,
        offset_range_px=5,
        offset_step_px=2,
        iter_without_resolution_gain=1,
        iter_without_large_changes=1,
    )


def test_sampling_is_fine_enough_below_three_quarters_of_the_accuracy():
    # RELION's updateAngularSampling: HEALPix order 5 samples 1.875°, its fine (oversampled) step is 0.9375°
    sch = stalled(5)
    sch.update_angular_sampling(
        accuracy_deg=1.3, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0
    )  # 0.9375 < 0.975: fine enough
    assert sch.fine_enough and sch.healpix_order == 5 and not sch.converged
    sch = stalled(5)
    sch.update_angular_sampling(
        accuracy_deg=1.2, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0
    )  # 0.9375 >= 0.9: one order finer
    assert not sch.fine_enough and sch.healpix_order == 6 and sch.local_search
    assert abs(sch.sigma_ang_deg - 2 * 0.46875) < 1e-9  # σ = 2 × the new fine step (RELION's updateAngularSampling)
    sch = Schedule(healpix_order=5, offset_range_px=5, offset_step_px=2)  # not stalled: nothing changes
    assert (
        sch.update_angular_sampling(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0) is None
        and not sch.fine_enough
    )


def test_convergence_needs_a_second_stall_after_the_sampling_was_found_fine_enough():
    """RELION checks convergence at the start of an iteration, before updateAngularSampling: the iteration after the one
    that found the sampling fine enough still runs, and the run converges only if the counters stall again."""
    sch = stalled(5)
    assert not sch.check_convergence()  # iteration k+1 starts: the sampling was never found fine enough
    sch.update_angular_sampling(accuracy_deg=2.0, auto_local_order=4, accuracy_offset_px=1.0, angpix=1.0)
    assert sch.fine_enough and not sch.final_iteration  # k+1 runs at the same sampling
    sch.update_resolution(sch.current_resolution_shell + 1)  # k+1 gained resolution: not stalled
    sch.update_changes(5.0, 1.0)
    assert not sch.check_convergence()
    sch.update_resolution(sch.current_resolution_shell)  # k+2 stalled
    sch.update_changes(5.0, 1.0)
    assert sch.check_convergence() and sch.final_iteration


def test_resolution_gain_is_against_the_previous_iteration():
    # RELION's updateCurrentResolution: a dip and a recovery is a gain (not against the best so far)
    sch = Schedule(healpix_order=2, offset_range_px=5, offset_step_px=2, current_resolution_shell=10)
    sch.update_resolution(12)
    assert sch.iter_without_resolution_gain == 0
    sch.update_resolution(11)
    assert sch.iter_without_resolution_gain == 1
    sch.update_resolution(12)  # below the best (12) but above the last (11): a gain
    assert sch.iter_without_resolution_gain == 0
    sch.update_resolution(12)
    assert sch.iter_without_resolution_gain == 1


def test_window_jumps_by_a_quarter_of_nyquist_once_the_fsc_is_high_at_its_edge():
    # ml_optimiser_mpi.cpp: has_high_fsc_at_limit once FSC[current_size/2 - 1] > 0.2;
    # updateImageSizeAndResolutionPointers: + ROUND(0.25 · ori_size / 2) while ave_Pmax > 0.1, else + incr_size
    box = 256
    sch = Schedule(healpix_order=2, offset_range_px=5, offset_step_px=2, current_resolution_shell=20, incr_size=10)
    fsc = np.zeros(box // 2 + 1)
    fsc[:30] = 0.9
    fsc[30:33] = 0.15  # the window of 32 shells ends at 0.15: not high
    sch.update_after_halves_fsc(fsc, 32)
    assert not sch.has_high_fsc_at_limit and sch.window_shell(box, ave_pmax=0.5) == 30
    fsc[31] = 0.25
    sch.update_after_halves_fsc(fsc, 32)
    assert sch.has_high_fsc_at_limit
    assert sch.window_shell(box, ave_pmax=0.5) == 20 + 32
    assert sch.window_shell(box, ave_pmax=0.05) == 30  # over-marginalised: incr_size
    sch.update_after_halves_fsc(np.zeros(box // 2 + 1), 40)
    assert sch.has_high_fsc_at_limit  # once set, stays set
    sch.final_iteration = True
    assert sch.window_shell(box, ave_pmax=0.5) == box // 2


def test_incr_size_grows_with_the_gap_between_fsc_half_and_0143():
    sch = Schedule(healpix_order=2, offset_range_px=5, offset_step_px=2, incr_size=10)
    fsc = np.concatenate([np.ones(20), np.linspace(0.6, 0.0, 30), np.zeros(15)])
    f05, f0143 = int(np.argmax(fsc < 0.5)), int(np.argmax(fsc < 0.143))
    sch.update_after_halves_fsc(fsc, 50)
    assert sch.incr_size == max(10, f0143 - f05 + 5) and sch.incr_size > 10
    sch.update_after_halves_fsc(np.concatenate([np.ones(20), np.zeros(45)]), 50)
    assert sch.incr_size == max(10, f0143 - f05 + 5)  # never shrinks


def test_resolution_from_data_vs_prior_checks_from_the_high_resolution_side():
    box = 64
    dvp = np.zeros(box // 2 + 1)
    dvp[:20] = 5.0
    assert resolution_from_data_vs_prior(dvp, box) == 19  # one shell inside the first below 1
    dvp[12] = 0.5  # a dip of one shell, with a ratio above 1 again 7 shells higher: RELION takes the higher shell
    assert resolution_from_data_vs_prior(dvp, box) == 19
    dvp[13:20] = 0.5
    dvp[14] = 2.0  # above 1 again only 3 shells higher: not trusted
    assert resolution_from_data_vs_prior(dvp, box) == 11
    assert resolution_from_data_vs_prior(np.zeros(box // 2 + 1), box) == 5  # never below minres_map


def relion_angular_distance(e1, e2, sym):
    """HealpixSampling::calculateAngularDistance, one pair at a time in numpy."""
    A = euler_to_matrix(*[torch.tensor(float(x), dtype=torch.float64) for x in e1]).numpy()
    B = euler_to_matrix(*[torch.tensor(float(x), dtype=torch.float64) for x in e2]).numpy()
    best = 1e9
    for S in symmetry_matrices(sym).numpy():
        E2 = B @ S
        best = min(best, np.mean([np.degrees(np.arccos(np.clip(A[i] @ E2[i], -1, 1))) for i in range(3)]))
    return best


def test_angular_change_is_relions_axis_distance_over_symmetry_mates():
    rng = np.random.default_rng(0)
    e1 = np.column_stack(
        [rng.uniform(-180, 180, 20), np.degrees(np.arccos(rng.uniform(-1, 1, 20))), rng.uniform(-180, 180, 20)]
    )
    e2 = e1 + rng.normal(0, 3, e1.shape)
    for sym in ("C1", "C4", "D2"):
        ours = angular_change_deg(*e1.T, *e2.T, sym=sym)
        ref = [relion_angular_distance(a, b, sym) for a, b in zip(e1, e2)]
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    # a move to a C4 mate is no change under C4, and a large one under C1
    A = euler_to_matrix(*[torch.as_tensor(e1[:, i]) for i in range(3)])
    mate = torch.stack(matrix_to_euler(A @ symmetry_matrices("C4")[1].to(A)), -1).numpy()
    assert angular_change_deg(*e1.T, *mate.T, sym="C4").max() < 1e-5
    assert angular_change_deg(*e1.T, *mate.T, sym="C1").min() > 30


def test_changes_within_three_percent_of_the_smallest_are_not_large():
    # RELION's updateOverallChangesInHiddenVariables: the counter grows unless a change falls > 3 % below the smallest
    sch = Schedule(healpix_order=3, offset_range_px=1, offset_step_px=0.25)  # fine steps 3.75° and 0.125 px
    sch.update_changes(3.17, 0.41)  # first at this sampling: below the initial 999 → large
    assert sch.iter_without_large_changes == 0
    sch.update_changes(3.10, 0.40)  # 3.10 · 1.03 = 3.19 ≥ 3.17 and 0.40 · 1.03 = 0.412 ≥ 0.41: not large
    assert sch.iter_without_large_changes == 1
    sch.update_changes(3.20, 0.38)  # 0.38 · 1.03 = 0.391 < 0.40 (the smallest now): large
    assert sch.iter_without_large_changes == 0
    assert (sch.smallest_change_orientation_deg, sch.smallest_change_offset_px) == (3.10, 0.38)
    sch.update_changes(3.5, 0.5)
    assert sch.iter_without_large_changes == 1


def test_changes_below_forty_percent_of_the_sampling_are_not_large():
    # RELION 4/5: 40 % of the fine steps, 1.875° and (per axis) 0.25 px here, make a change small whatever the minimum
    sch = Schedule(healpix_order=4, offset_range_px=2, offset_step_px=0.5)
    sch.update_changes(1.0, 0.5)  # first at this sampling: large
    assert sch.iter_without_large_changes == 0
    sch.update_changes(0.70, 0.14)  # 0.70 < 0.75 and 0.14/√2 = 0.099 < 0.1: small although far below the minima
    assert sch.iter_without_large_changes == 1
    sch.update_changes(0.60, 0.20)  # 0.60 < 0.75; 0.20/√2 = 0.141 ≥ 0.1 but 0.206 ≥ 0.14: small too
    assert sch.iter_without_large_changes == 2
    sch.update_changes(0.8, 0.05)  # 0.8 ≥ 0.75 but 0.824 ≥ 0.6; the offset is below 40 %: not large
    assert sch.iter_without_large_changes == 3
    fresh = Schedule(healpix_order=4, offset_range_px=2, offset_step_px=0.5)
    fresh.update_changes(1.0, 0.5)
    fresh.update_changes(0.9, 0.5)  # 0.9 ≥ 0.75 and 0.927 < 1.0: a large angular change
    assert fresh.iter_without_large_changes == 0


def test_finer_offsets_follow_relions_rule():
    # RELION's updateAngularSampling at 2 Å/px, accuracy 0.6 px = 1.2 Å: step min(1.5, 0.9) · 2 = 1.8 Å = 0.9 px;
    # last rms change 0.2828 px (0.2 px per axis): range 5 · 0.2 = 1.0 px, at least 1.5 · 0.9 = 1.35 px
    sch = stalled(3)
    sch.offset_range_px, sch.offset_step_px, sch.last_change_offset_px = 5.0, 2.0, 0.2 * 2**0.5
    sch.update_angular_sampling(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=0.6, angpix=2.0)
    assert sch.healpix_order == 4
    assert abs(sch.offset_step_px - 0.9) < 1e-9 and abs(sch.offset_range_px - 1.35) < 1e-9
    # a large change: range capped at 1.3 × 1.35, then halved beyond 4 steps? 1.755 < 3.6: kept
    sch = stalled(3)
    sch.offset_range_px, sch.offset_step_px, sch.last_change_offset_px = 1.35, 0.9, 3.0
    sch.update_angular_sampling(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=0.6, angpix=2.0)
    assert abs(sch.offset_range_px - 1.3 * 1.35) < 1e-9 and abs(sch.offset_step_px - 0.9) < 1e-9
    # a coarse accuracy would widen the step (1.5 Å · 2 = 3 Å = 1.5 px > 1 px now): the sampling stays as it is
    sch = stalled(3)
    sch.offset_range_px, sch.offset_step_px, sch.last_change_offset_px = 2.0, 1.0, 0.5
    sch.update_angular_sampling(accuracy_deg=1.0, auto_local_order=4, accuracy_offset_px=5.0, angpix=2.0)
    assert (sch.offset_range_px, sch.offset_step_px) == (2.0, 1.0)
