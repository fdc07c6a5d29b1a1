"""Auto-refine's last volume rung: half set 1's back-projector waits in host memory while half set 2 is scored
(memory.park_finished_half, steps.parking_note). The decision itself is tested with the memory plan's others in
tests/estep/test_memory.py; here a run that parks: run.log says so, and on the GPU the M-step finds half set 1's
accumulators on the host and the maps are those of a run that keeps both on the GPU."""

import numpy as np
import pytest
import torch

from cryorefine.io.mrc import read_map
from cryorefine.refine import steps
from cryorefine.refine.auto_refine import refine
from cryorefine.refine.config import RefineConfig
from small_set import small_set

BOX, ANGPIX, N = 32, 6.0, 60
NOTE = "half set 1's back-projector in host memory (the test's)"


def _refine(d, out, device):
    cfg = RefineConfig(
        particles=str(d / "particles_noposes.star"),
        output_root=str(out / "run"),
        reference=str(d / "start.mrc"),
        ini_high=30.0,
        particle_diameter=170.0,
        ctf=True,
        healpix_order=1,
        offset_range=2.0,
        offset_step=1.0,
        max_iter=2,
        random_seed=3,
        low_resol_join_halves=0.0,
        device=device,
    )
    return refine(cfg)


def _parking(monkeypatch):
    """Force the rung and record where the M-step finds each half set's accumulators."""
    seen = []
    plan = steps.mstep_plan

    def spy(ctx, it, bps, *a):
        seen.append([bp.data.device.type for bp in bps])
        return plan(ctx, it, bps, *a)

    monkeypatch.setattr(steps, "parking_note", lambda ctx, it: NOTE)
    monkeypatch.setattr(steps, "mstep_plan", spy)
    return seen


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_a_parked_half_is_said_in_run_log(tmp_path, monkeypatch):
    d = small_set(tmp_path / "data", BOX, ANGPIX, N, seed=8)
    seen = _parking(monkeypatch)
    _refine(d, tmp_path / "cpu", "cpu")
    log = (tmp_path / "cpu" / "run.log").read_text()
    assert log.count(NOTE) == len(seen) >= 2, log


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_parked_half_gives_the_maps_of_one_kept_on_the_gpu(tmp_path, monkeypatch):
    d = small_set(tmp_path / "data", BOX, ANGPIX, N, seed=8)
    _refine(d, tmp_path / "kept", "cuda")
    seen = _parking(monkeypatch)
    _refine(d, tmp_path / "parked", "cuda")
    assert seen and all(devices == ["cpu", "cuda"] for devices in seen), seen
    for name in ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_class001.mrc"):
        kept, parked = read_map(tmp_path / "kept" / name)[0], read_map(tmp_path / "parked" / name)[0]
        assert _corr(kept, parked) > 0.999, name
