"""--gpu_memory GiB: a run allocates at most that much of the GPU (the per-process cap every memory decision reads)
and says so in run.log; a negative value is a one-line error."""

import pytest
import torch

from cryorefine.cli.main import main as cli
from small_set import small_set

FLAGS = "--ini_high 30 --particle_diameter 170 --iter 1 --healpix_order 1 --offset_range 2 --offset_step 1".split()


def test_a_negative_budget_is_refused(tmp_path, capsys):
    d = small_set(tmp_path, 32, 6.0, 20, seed=1)
    argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / "r/run"), "--ref", str(d / "start.mrc"),
            "--gpu_memory", "-1", *FLAGS]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu_memory" in err[0], err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_run_keeps_within_the_budget(tmp_path):
    d = small_set(tmp_path, 32, 6.0, 60, seed=1)
    total = torch.cuda.mem_get_info(0)[1]
    try:
        argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / "r/run"), "--ref", str(d / "start.mrc"),
                "--gpu", "--gpu_memory", "2", *FLAGS]  # fmt: skip
        assert cli(argv) == 0
        assert torch.cuda.get_per_process_memory_fraction(0) == pytest.approx(2 * 2**30 / total)
        assert torch.cuda.max_memory_allocated(0) <= 2 * 2**30
        assert "--gpu_memory: at most 2.0 of the GPU's" in (d / "r/run.log").read_text()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)  # the other GPU tests get the whole card


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("buffer", ["gpu", "host"])
def test_an_mstep_that_does_not_fit_runs_on_the_host_with_the_same_result(tmp_path, monkeypatch, buffer):
    """The memory plan told that the M-step cannot fit (and, for ``host``, neither its transforms' buffer): the
    accumulators go to the host, run.log says so, and the run ends at the resolution of the all-GPU run."""
    from cryorefine.estep import memory

    d = small_set(tmp_path, 32, 6.0, 60, seed=1)
    flags = "--ini_high 30 --particle_diameter 170 --iter 3 --healpix_order 1 --offset_range 2 --offset_step 1".split()
    runs = {}
    for name in ("gpu", "planned"):
        if name == "planned":
            monkeypatch.setattr(memory, "mstep_bytes", lambda *a: 1 << 50)
            if buffer == "host":
                monkeypatch.setattr(memory, "transform_buffer_bytes", lambda *a: 1 << 50)
        argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / name / "run"), "--ref",
                str(d / "start.mrc"), "--gpu", *flags]  # fmt: skip
        assert cli(argv) == 0
        runs[name] = (d / name / "run.log").read_text()
    assert "M-step on the GPU" in runs["gpu"] and "M-step on the host" not in runs["gpu"]
    where = "GPU" if buffer == "gpu" else "host (pinned)"
    assert "M-step on the host" in runs["planned"] and f"buffer on the {where}" in runs["planned"]
    resolution = [[line.split("resolution ")[1].split(" Å")[0] for line in log.splitlines() if "resolution " in line]
                  for log in runs.values()]  # fmt: skip
    assert resolution[0] == resolution[1]
