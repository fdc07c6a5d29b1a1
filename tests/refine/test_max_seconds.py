"""--max_seconds: a run whose last iteration fits the budget has finished (no resume hint after the final iteration);
one stopped before its end names the checkpoint to continue from."""

import json

from cryorefine.cli.main import main as cli
from small_set import small_run_flags, small_set


def _refine(d, out, max_iter: str, capsys) -> dict:
    argv = ["refine", *small_run_flags(d, out), "--auto_refine", "--split_random_halves", "--iter", max_iter]
    assert cli([*argv, "--max_seconds", "0.01", "--batch", "16", "--j", "1"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_run_that_ends_within_the_budget_has_finished(tmp_path, capsys):
    d = small_set(tmp_path, 32, 6.0, 24, seed=11)
    # the first iteration always runs (no estimate of its time yet); with --iter 1 it is the final one
    summary = _refine(d, tmp_path / "one", "1", capsys)
    log = (tmp_path / "one" / "run.log").read_text()
    assert "stopping after iteration" not in log and "finished: " in log
    assert not summary.get("stopped") and summary["iterations"] == 1
    assert (tmp_path / "one" / "run_class001.mrc").exists()
    # with more to do, the budget stops it after the first iteration and says how to continue
    summary = _refine(d, tmp_path / "more", "5", capsys)
    assert summary["stopped"] and summary["iterations"] == 1
    assert summary["continue_from"].endswith("run_it001_optimiser.star")
    assert "resume with --continue" in (tmp_path / "more" / "run.log").read_text()
