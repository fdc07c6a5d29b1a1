"""bench/scaling.py end to end on the tiny set with 1 and 2 CPU ranks (gloo): runs, comparison, result files (~40 s)."""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("scaling", REPO / "bench" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_one_and_two_cpu_ranks(tmp_path, monkeypatch):
    sc = _load()
    monkeypatch.setenv("COMMIT", "0123456789abcdef")
    w, out = tmp_path / "w", tmp_path / "out"
    assert (
        sc.main(["tiny", "--gpus", "1 2", "--no_gpu", "--workdir", str(w), "--out", str(out), "--budget", "300"]) == 0
    )
    js = list(out.glob("*-cpu-scaling-tiny.json"))
    assert len(js) == 1 and js[0].with_suffix(".md").exists()
    r = json.loads(js[0].read_text())
    assert r["commit"] == "0123456789abcdef" and r["commit_source"] == "env COMMIT" and r["host"]["gpus"] == 0
    assert [x["n"] for x in r["runs"]] == [1, 2] and not r["skipped"]
    for run in r["runs"]:
        n = run["n"]
        assert run["rc"] == 0 and run["finished"] and run["status"].startswith("finished") and run["n_iterations"] == 2
        assert run["world_size"] == n and run["backend"] == "gloo" and run["batch_size"] == (256 if n == 1 else 64)
        assert run["gold"]["fsc0143_angst"] > 0 and run["process_wall_s"] > run["iterations_wall_s"] > 0
        for it in run["iterations"]:
            assert len(it["batches_per_rank"]) == n and sum(it["batches_per_rank"]) == 2  # one batch per half set
            assert "combine ranks" in it["stages_s"] and it["combine_s"] >= 0 and it["seconds"] > 0
    base, two = r["runs"][0]["vs_n1"], r["runs"][1]["vs_n1"]
    assert base["speedup_iterations"] == pytest.approx(1.0) and base["efficiency_total"] == pytest.approx(1.0)
    assert two["common_iterations"] == [1, 2] and two["same_schedule"] and two["same_iteration_count"]
    assert two["efficiency_iterations"] == pytest.approx(two["speedup_iterations"] / 2) and two["speedup_total"] > 0
    md = js[0].with_suffix(".md").read_text()
    for text in ["## Summary", "## Per iteration", "efficiency T1/(N·TN)", "combine ranks", "--nproc_per_node 2"]:
        assert text in md
    with tarfile.open(str(js[0])[:-5] + "-logs.tgz") as tar:
        names = tar.getnames()
    assert {"scaling-tiny/n1/torchrun.log", "scaling-tiny/n2/run.log"} <= set(names)
    assert len(list(out.iterdir())) == 3
