"""bench/paper_bench.py on a tiny set, CPU only: build, a run stopped by --max_seconds, --continue, CPU subset, results.

The tiny set is make_bench_data.py D 32 4.0 40 2 20 (the 4E43 model: 6msm does not fit a 128 Å box), SNR 2, and the
paper flags with hp1, offsets 2/1 px and --iter 2, so that the whole path runs in well under a minute.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cryorefine.cli.main import main as cli

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("paper_bench", REPO / "bench" / "paper_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_bench"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


pb = _load()


def test_paper_flags_are_relion_readme_flags():
    f = pb.SETS["betagal"].flags
    for flag in [
        "--auto_refine",
        "--split_random_halves",
        "--ctf",
        "--flatten_solvent",
        "--zero_mask",
        "--norm",
        "--scale",
    ]:
        assert flag in f
    val = dict(zip(f[7::2], f[8::2]))
    assert val == {
        "--healpix_order": "2",
        "--auto_local_healpix_order": "4",
        "--offset_range": "5",
        "--offset_step": "2",
        "--particle_diameter": "265",
        "--ini_high": "40",
        "--pad": "2",
        "--sym": "C1",
        "--random_seed": "0",
        "--pool": "30",
        "--oversampling": "1",
        "--low_resol_join_halves": "0",
    }
    c = pb.SETS["empiar10028"].flags
    assert (
        "--firstiter_cc" in c
        and c[c.index("--K") + 1] == "6"
        and c[c.index("--iter") + 1] == "25"
        and c[c.index("--tau2_fudge") + 1] == "4"
    )
    assert (
        pb.SETS["trpv1"].make == (256, 1.2156, 5000, 4, 40)
        and pb.SETS["trpv1_full"].n == 35645
        and pb.SETS["empiar10028"].make == (360, 1.34, 3000, 6, 70)
    )


def test_oversampling_other_than_one_is_refused(tmp_path, capsys):
    rc = cli(["refine", "--continue", str(tmp_path / "x_it001_optimiser.star"), "--oversampling", "2"])
    assert rc == 2


@pytest.mark.slow
def test_tiny_run_stop_continue_and_results(tmp_path):
    w, out = tmp_path / "w", tmp_path / "out"
    s = pb.SETS["tiny"]
    p = pb.Paths(w, s)
    assert pb.main(["build", "tiny", "--workdir", str(w), "--no_gpu"]) == 0
    build = json.loads((p.data / "build.json").read_text())
    assert set(build["steps"]) == {"make_bench_data", "project", "add_noise", "reference"} and build["n"] == 40
    # a first call that the wall-time budget stops after one iteration, as the harness would run it (a budget shorter
    # than any iteration: 1 s was not, once a tiny iteration took under half a second)
    assert cli(pb.job_argv(s, p, False, 0.01)) == 0
    assert pb.iterations_done(p.run_root) == [1] and not pb.is_finished(s, p)
    # the harness continues it (--continue), finishes, runs the CPU subset and writes the results
    assert pb.main(["run", "tiny", "--workdir", str(w), "--out", str(out), "--no_gpu", "--budget", "400"]) == 0
    assert pb.is_finished(s, p) and pb.iterations_done(p.run_root) == [1, 2]
    assert sorted(p.run_dir.glob("run_it*_state.pt")) == [p.run_dir / "run_it002_state.pt"]  # older states pruned
    js = list(out.glob("*-cpu-tiny.json"))
    assert len(js) == 1 and js[0].with_suffix(".md").exists() and Path(str(js[0])[:-5] + "-run.tgz").exists()
    r = json.loads(js[0].read_text())
    assert r["finished"] and r["n_iterations"] == 2 and r["device"] == "cpu" and r["commit"]
    assert r["calls"][0]["argv"][1:3] == ["refine", "--continue"] and r["calls"][0]["iterations"] == [1, 2]
    for it in r["iterations"]:
        assert set(it["stages_s"]) == set(pb.STAGES) and it["wall_s"] > 0 and "plan" in it["host_s"]
        assert it["estep_wall_s"] > sum(it["stages_s"][k] for k in pb.STAGES[:-1])
        assert it["gold_fsc0143_angst"] and it["mean_rlnNrOfSignificantSamples"] >= 1
        assert it["coarse_flops"] > 0 and it["coarse_tflops"] > 0 and it["fine_flops"] > 0 and it["store_flops"] > 0
    # the harness's call (the continued one) from its start to its first E-step batch: shorter than the call
    (startup,) = r["total"]["startup_s"]
    assert 0 < startup < r["calls"][0]["wall_s"], (startup, r["calls"][0])
    flops = r["total"]["stage_flops"]
    assert flops["getAllSquaredDifferences"] == sum(it["coarse_flops"] + it["fine_flops"] for it in r["iterations"])
    assert flops["storeWeightedSums"] == sum(it["store_flops"] for it in r["iterations"])
    # bytes: each iteration reads the 40 images of 32² float32 once and writes at most a half-plane of 32 x 17 pixels
    # of two transforms (complex64), the CTF and 1/σ² (float32) per particle
    moved = r["total"]["stage_bytes"]
    assert 2 * 40 * 32 * 32 * 4 < moved["getFourierTransformsAndCTFs"] <= 2 * 40 * (32 * 32 * 4 + 32 * 17 * 24)
    assert moved["convertAllDiff2ToWeights"] > 0
    assert (
        r["final_gold"]["fsc0143_angst"] > 0
        and r["fsc_to_truth"]["fsc05_angst"] > 0
        and r["pose_errors"]["n_matched"] == 40
    )
    assert r["coarse"]["cublas_reference"]["shapes"][0]["fp32_tflops"] > 0
    assert r["memory"]["peak_host_rss_bytes"] > 0
    cpu = r["cpu_subset"]
    assert cpu["status"] == "ok" and cpu["n"] == 8 and cpu["cpu_over_gpu_iteration"] > 0
    md = js[0].with_suffix(".md").read_text()
    for text in [
        "## Per iteration",
        "convertAllSquaredDifferencesToWeights",
        "## Coarse pass",
        "| stage | s | share | counted TFLOP | TFLOP/s | of FP32 peak | counted GB | GB/s | of HBM peak |",
        "| plan (host only) |",
        "| E-step outside its stages (on a GPU: the device idle) |",
        "| start-up (the call's start to its first E-step batch; per call) |",
        "## CPU path",
        "--low_resol_join_halves 0",
    ]:
        assert text in md
    # a report call rebuilds the same files from the disk
    assert pb.main(["report", "tiny", "--workdir", str(w), "--out", str(out / "again"), "--no_gpu"]) == 0
    assert json.loads(next((out / "again").glob("*.json")).read_text())["n_iterations"] == 2
    # bench/startup_phases.py on the same data: a fresh process's phases, in order, the run inside them
    spec = importlib.util.spec_from_file_location("startup_phases", REPO / "bench" / "startup_phases.py")
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    profile = tmp_path / "startup-profile.txt"
    assert sp.main(["tiny", str(tmp_path / "startup.json"), "--workdir", str(w), "--profile", str(profile)]) == 0
    text = profile.read_text()
    assert "auto_refine.py:" in text  # the start-up profile holds the run set-up
    assert "Callers of the main thread's waits and hashing:" in text
    phases = json.loads((tmp_path / "startup.json").read_text())
    marks = phases["marks_s"]
    assert list(marks) == [
        "interpreter up", "torch imported", "cryorefine imported", "first E-step batch", "run ended (main returned)",
        "process ended",
    ]  # fmt: skip
    assert all(0 <= a < b for a, b in zip(list(marks.values()), list(marks.values())[1:])), marks
    ran = marks["run ended (main returned)"] - marks["cryorefine imported"]
    assert phases["summary"]["iterations"] == 2 and 0 < phases["run_s"] < ran


def test_busy_sampler_averages_the_gpus_utilisation_and_stops_without_nvml():
    readings = iter([100.0, 50.0, 0.0] + [None] * 100)
    sampler = pb.BusySampler(lambda: next(readings), period=0.001)
    sampler.start()
    sampler.join(timeout=5)
    assert not sampler.is_alive() and sampler.mean_percent() == 50.0
    quiet = pb.BusySampler(lambda: None, period=0.001)
    quiet.start()
    quiet.join(timeout=5)
    assert quiet.mean_percent() is None


def test_a_clean_start_drops_the_calls_of_the_run_before_it(tmp_path):
    """A call that begins at iteration 0 starts the list of calls again (the report adds up their wall time); a call
    that continues a run is added to it."""
    p = pb.Paths(tmp_path, pb.SETS["tiny"])
    p.root.mkdir(parents=True)
    old = {"iterations": [0, 14], "wall_s": 13.5}
    pb.write_json(p.calls, [old])
    clean = {"iterations": [0, 15], "wall_s": 14.0}
    assert pb.calls_with(p, clean) == [clean]
    pb.write_json(p.calls, [clean])
    more = {"iterations": [15, 16], "wall_s": 1.0}
    assert pb.calls_with(p, more) == [clean, more]


def test_coarse_precision_is_the_one_the_run_used():
    """A GPU run without --precision used TF32 (the default); the report once called it fp32."""
    base = ["refine", "--i", "p.star", "--o", "run/run", "--ref", "r.mrc"]
    assert pb.coarse_precision([*base, "--gpu"]) == "tf32"
    assert pb.coarse_precision([*base, "--gpu", "0", "--precision", "fp32"]) == "fp32"
    assert pb.coarse_precision([*base, "--precision", "fp16", "--gpu"]) == "fp16"
    assert pb.coarse_precision(base) == "fp32"  # the CPU has no TF32
    assert pb.coarse_precision([*base, "--batch_size", "64"]) == "unknown"  # refused by cryorefine: no crash
