"""bench/relion5/run.py, the harness that runs RELION beside our paper benchmarks, driven here by Debian's RELION
3.1.3 on the CPU (the same relion_refine_mpi command line as RELION 5's) on the tiny set: RELION reads the set's
particles and flags, its run is timed and its resolution read from RELION's own files, and paper_bench.py's report
quotes the measured run instead of the README's figures."""

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


pb = _load("paper_bench", REPO / "bench" / "paper_bench.py")
r5 = _load("relion5_run", REPO / "bench" / "relion5" / "run.py")


def test_relion_gets_the_sets_flags_and_its_resource_flags(tmp_path):
    s = pb.SETS["empiar10028"]
    argv = r5.relion_argv(s, pb.Paths(tmp_path, s), tmp_path / "relion5" / "run", 6, True)
    assert argv[argv.index("--i") + 1].endswith("data/particles_noposes.star")  # no true poses
    assert argv[argv.index("--ref") + 1].endswith("data/init60.mrc")
    assert argv[argv.index("--K") + 1] == "6" and "--firstiter_cc" in argv and argv[-2:] == ["--gpu", ""]
    assert argv[argv.index("--j") + 1] == "6" and "--ctf_corrected_ref" in argv and "--auto_refine" not in argv
    r = pb.SETS["betagal"]
    argv = r5.relion_argv(r, pb.Paths(tmp_path, r), tmp_path / "run", 1, False)
    assert argv.count("--auto_refine") == 1 and "--split_random_halves" in argv and "--gpu" not in argv
    # RELION-5 reconstructs without gridding iterations by default (and warns of --skip_gridding): ours are told
    ours = pb.job_argv(r, pb.Paths(tmp_path, r), True, None)
    assert "--skip_gridding" not in argv and "--skip_gridding" in ours


@pytest.mark.slow
@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None, reason="no MPI RELION")
def test_relion_beside_the_tiny_run(tmp_path, monkeypatch):
    """The harness's plumbing, on 2 iterations of each program: RELION 3.1.3 takes 12 iterations and over a minute of
    CI to converge on the tiny set, and stops at --auto_iter_max without a final iteration (the resolution is then
    its last iteration's)."""
    s = pb.SETS["tiny"]
    monkeypatch.setitem(pb.SETS, "tiny", dataclasses.replace(s, flags=[*s.flags, "--auto_iter_max", "2"]))
    w, out = tmp_path / "w", tmp_path / "out"
    relion_bin = str(Path(shutil.which("relion_refine_mpi")).parent)
    argv = ["tiny", "--workdir", str(w), "--relion", relion_bin, "--no_gpu", "--ranks", "3", "--threads", "1"]
    assert r5.main([*argv, "--out", str(out), "--budget", "300"]) == 0
    p = pb.Paths(w, s)
    m = json.loads((p.root / "relion5" / "relion5.json").read_text())
    assert m["rc"] == 0 and m["relion"].startswith("RELION version: 3.1") and m["device"] == "cpu"
    assert m["iterations"] == len(m["iteration_times_s"]) >= 2 and all(t > 0 for t in m["iteration_times_s"])
    assert m["status"] == "finished" and "--auto_iter_max 2" in m["command"]
    assert 8.0 < m["resolution_angst"] < 60.0  # 40 particles of 32 px at 4 Å/px: RELION's own figure, read back
    assert (p.root / "relion5" / "run_it001_optimiser.star").exists() and list(out.glob("*-cpu-tiny-relion5.json"))
    # our run of the same set; its report quotes RELION's measured run
    assert pb.main(["run", "tiny", "--workdir", str(w), "--out", str(out), "--no_gpu", "--cpu_n", "0"]) == 0
    r = json.loads(next(out.glob("*-cpu-tiny.json")).read_text())
    assert r["relion5"]["source"].startswith("measured here") and r["relion5"]["wall_s"] == m["wall_s"]
    assert r["relion5_particle_iterations_per_s"] == pytest.approx(40 * m["iterations"] / m["wall_s"])
    assert "RELION-5 (measured here)" in next(out.glob("*-cpu-tiny.md")).read_text()


def test_a_run_past_its_budget_is_stopped_with_its_children(tmp_path):
    """Past the budget the whole process group goes, also a child that ignores SIGTERM (mpirun's ranks would
    otherwise keep the GPU busy); and what a finished command leaves behind goes too."""
    import time

    late, stubborn, orphan = (tmp_path / name for name in ("child", "stubborn_child", "orphan"))
    with open(tmp_path / "log", "w") as log:
        t0 = time.time()
        cmd = f"(sleep 2; touch {late}) & sh -c 'trap \"\" TERM; sleep 2; touch {stubborn}' & sleep 30"
        rc = r5.run_within(["sh", "-c", cmd], tmp_path, log, budget_s=0.5)
        assert rc is None and time.time() - t0 < 15
        assert r5.run_within(["sh", "-c", f"(sleep 2; touch {orphan}) & exit 3"], tmp_path, log, budget_s=10) == 3
    time.sleep(2.5)
    assert not late.exists() and not stubborn.exists() and not orphan.exists()
