"""Classification's last volume rung: the K references wait in host memory and each is copied to the device while its
class is scored (engine.HostReferences; the decision, memory.references_on_host, is tested with the plan's others in
tests/estep/test_memory.py). A run with the rung forced says so in run.log and gives the maps of a run that keeps its
references on the device: bit for bit on the CPU, and on the GPU (where the copies are real) the same maps."""

import numpy as np
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.io.mrc import read_map
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.refine import steps
from cryorefine.refine.engine import HostReferences, prepare_references
from small_set import small_run_flags, small_set

BOX, ANGPIX, N, K = 32, 6.0, 60, 3
NOTE = "the 3 references in host memory (the test's)"


def _classify(d, out, gpu=False):
    argv = ["classify", *small_run_flags(d, out), "--K", str(K), "--iter", "2", "--random_seed", "4"]
    assert main(argv + (["--gpu"] if gpu else [])) == 0


def _forced(monkeypatch):
    """Force the rung; returns the kind of every reference sequence made."""
    kinds = []

    def spy(*a, **kw):
        refs = prepare_references(*a, **kw)
        kinds.append(type(refs).__name__)
        return refs

    monkeypatch.setattr(steps, "references_on_host_note", lambda ctx, plan, classes: NOTE)
    monkeypatch.setattr(steps, "prepare_references", spy)
    return kinds


def test_host_references_are_the_references_on_the_device():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn((BOX, BOX, BOX), generator=g) for _ in range(3)]
    want = [prepare_padded_transform(m, 2, 40) for m in maps]
    got = prepare_references(maps, 2, "cpu", 40, on_host=True)
    assert isinstance(got, HostReferences) and len(got) == 3
    for w, r in zip(want, got):
        assert torch.equal(w.f_padded, r.f_padded) and (r.box, r.pad, r.size) == (BOX, 2, 40)
    assert [r.size for r in got[1:]] == [40, 40]
    assert isinstance(prepare_references(maps, 2, "cpu", 40), list)  # without the rung: a plain list


def test_references_on_the_host_are_said_in_run_log_and_change_nothing(tmp_path, monkeypatch):
    d = small_set(tmp_path / "data", BOX, ANGPIX, N, seed=8)
    _classify(d, tmp_path / "kept")
    kinds = _forced(monkeypatch)
    _classify(d, tmp_path / "host")
    assert kinds.count("HostReferences") == 2, kinds  # one per E-step (the accuracy estimates make lists)
    assert (tmp_path / "host" / "run.log").read_text().count(NOTE) == 2
    for k in range(1, K + 1):
        name = f"run_it002_class{k:03d}.mrc"
        assert np.array_equal(read_map(tmp_path / "kept" / name)[0], read_map(tmp_path / "host" / name)[0]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_references_on_the_host_give_the_maps_of_references_on_the_gpu(tmp_path, monkeypatch):
    """The GPU's atomic additions make two runs of the same job differ slightly: the host run must stay as close to
    a kept run as a second kept run does (or within 1e-5 of the map's peak where the GPU repeats itself)."""
    d = small_set(tmp_path / "data", BOX, ANGPIX, N, seed=8)
    _classify(d, tmp_path / "kept", gpu=True)
    _classify(d, tmp_path / "again", gpu=True)
    kinds = _forced(monkeypatch)
    _classify(d, tmp_path / "host", gpu=True)
    assert kinds.count("HostReferences") == 2, kinds  # one per E-step (the accuracy estimates make lists)
    for k in range(1, K + 1):
        name = f"run_it002_class{k:03d}.mrc"
        a, again, b = (read_map(tmp_path / run / name)[0] for run in ("kept", "again", "host"))
        peak = float(np.abs(a).max())
        scatter = float(np.abs(a - again).max())
        assert scatter < 0.05 * peak, (name, scatter, peak)  # the same job: no particle changed its class
        diff = float(np.abs(a - b).max())
        assert diff <= max(2 * scatter, 1e-5 * peak), (name, diff, scatter, peak)
