"""RELION 3.1.3's own auto-refine schedule replayed through ours: the measurements RELION wrote each iteration (mean
pmax, half-set FSC, pose changes, resolution, expected accuracies; bench/relion_schedule_trace.py of a run on the
held-out sets of bench/fidelity_sets.py) go into our Schedule in RELION's order, and every decision RELION took
must come out: the E-step window, incr_size, the high-FSC flag, both counters, the HEALPix order, local searches,
the offset range and step, and convergence."""

import json
import math
from pathlib import Path

import pytest

from cryorefine.fourier.grids import relion_round
from cryorefine.refine.schedule import Schedule

DATA = Path(__file__).parent / "data"
SETS = ["bigbox", "sym", "prefori"]  # box 192 C1, box 80 C2, box 96 with 70 % preferred views
AUTO_LOCAL_ORDER, OFFSET_RANGE_PX, OFFSET_STEP_PX = 3, 5.0, 2.0  # bench/relion_fidelity.sh's flags


def load(name: str) -> dict:
    return json.loads((DATA / f"relion313_{name}_schedule.json").read_text())


def replay(trace: dict, sch: Schedule) -> list[str]:
    box, angpix = trace["box"], trace["angpix"]
    wrong, ave_pmax = [], 0.0
    for it in trace["iterations"]:
        k = it["iteration"]
        if k > 1:
            sch.check_convergence()
            if sch.final_iteration:
                wrong.append(f"it {k}: converged, RELION did not")
                break
        window = sch.window_shell(box, ave_pmax)
        if window != it["current_size"] // 2:
            wrong.append(f"it {k}: window {window}, RELION {it['current_size'] // 2}")
        if k >= 2:
            sch.update_angular_sampling(
                it["accuracy_rotation_deg"], AUTO_LOCAL_ORDER, it["accuracy_translation_angst"] / angpix, angpix
            )
        got = (
            sch.healpix_order,
            sch.local_search,
            round(sch.offset_range_px * angpix, 4),
            round(sch.offset_step_px * angpix, 4),
        )
        want = (it["healpix_order"], it["local"], round(it["offset_range_angst"], 4), round(it["offset_step_angst"], 4))
        if (
            got[:2] != want[:2] or abs(got[2] - want[2]) > 2e-3 or abs(got[3] - want[3]) > 2e-3
        ):  # RELION writes 6 digits
            wrong.append(f"it {k}: sampling {got}, RELION {want}")
        sch.update_after_halves_fsc(it["fsc"], window)
        sch.update_changes(
            it["changes_orientation_deg"], it["changes_offset_angst"] * math.sqrt(2) / angpix, it["changes_classes"]
        )
        sch.update_resolution(relion_round(box * angpix / it["resolution_angst"]))
        got = (
            sch.incr_size,
            int(sch.has_high_fsc_at_limit),
            sch.iter_without_resolution_gain,
            sch.iter_without_large_changes,
        )
        want = (
            it["incr_size"],
            it["has_high_fsc_at_limit"],
            it["iter_without_resolution_gain"],
            it["iter_without_large_changes"],
        )
        if got != want:
            wrong.append(f"it {k}: incr_size, high FSC, counters {got}, RELION {want}")
        ave_pmax = it["ave_pmax"]
    else:
        if trace["converged_after"] is not None and not sch.check_convergence():
            wrong.append(f"RELION converged after iteration {trace['converged_after']}, ours not")
    return wrong


def fresh(trace: dict) -> Schedule:
    ini = relion_round(trace["box"] * trace["angpix"] / trace["ini_high"])
    return Schedule(2, OFFSET_RANGE_PX, OFFSET_STEP_PX, current_resolution_shell=ini, incr_size=10)


@pytest.mark.parametrize("name", SETS)
def test_relions_schedule_replays_decision_by_decision(name):
    trace = load(name)
    assert len(trace["iterations"]) >= 10 and trace["converged_after"] is not None
    wrong = replay(trace, fresh(trace))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "mutation", ["fixed window", "fixed incr_size", "40 % of the current sampling", "no class rule"]
)
def test_each_rule_is_needed(mutation, monkeypatch):
    """Negative controls: the schedule rules this replaced must part from RELION's decisions."""
    from cryorefine.refine import schedule

    trace = load("bigbox")
    sch = fresh(trace)
    if mutation == "fixed window":
        monkeypatch.setattr(schedule, "JUMP_MIN_AVE_PMAX", 2.0)  # never jump by 25 % of Nyquist
    elif mutation == "fixed incr_size":
        monkeypatch.setattr(schedule, "first_below", lambda curve, threshold: -1)
    elif mutation == "40 % of the current sampling":
        monkeypatch.setattr(Schedule, "__post_init__", lambda self: None)
        monkeypatch.setattr(
            Schedule, "initial_healpix_order", property(lambda self: self.healpix_order, lambda self, v: None)
        )
        monkeypatch.setattr(
            Schedule, "initial_offset_step_px", property(lambda self: self.offset_step_px, lambda self, v: None)
        )
    else:
        monkeypatch.setattr(schedule, "RESET_CHANGE_CLASSES", 0.0)
    assert replay(trace, sch)
