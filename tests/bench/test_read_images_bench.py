"""bench/read_images.py on a tiny stack: both trees timed in fresh processes, the result files written."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_read_images_bench_times_both_trees(tmp_path):
    spec = importlib.util.spec_from_file_location("read_images_bench", REPO / "bench" / "read_images.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    argv = [str(out), "--old", str(REPO / "src"), "--n", "30", "--box", "16", "--repeats", "2"]
    assert bench.main([*argv, "--workdir", str(tmp_path / "w")]) == 0
    r = json.loads(out.read_text())
    assert set(r["seconds"]) == {"new", "old"} and all(len(v) == 2 and min(v) > 0 for v in r["seconds"].values())
    assert r["images"] == 30 and "| new |" in out.with_suffix(".md").read_text()
