"""report.html's refresher: reports drawn in a worker process, held back by the interval, the latest one drawn at the
end, a failure told in one line and the run going on, and the run's process drawing where no worker starts."""

import os
from pathlib import Path

from cryorefine.refine import report_refresh
from cryorefine.refine.report_refresh import ReportRefresher


def _pid_to(path):  # module-level: the worker imports it by name
    Path(path).write_text(str(os.getpid()))


def _fails(path):
    raise ValueError("no plot")


def test_reports_are_drawn_in_a_worker_process_when_due_and_at_the_end(tmp_path, monkeypatch):
    said: list[str] = []
    refresher = ReportRefresher(said.append, _pid_to)
    refresher.submit((tmp_path / "a",))  # the first refresh is REPORT_INTERVAL_S into the run: held back
    refresher.submit((tmp_path / "b",))  # the latest replaces it
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    refresher.flush()
    assert not (tmp_path / "a").exists()
    assert int((tmp_path / "b").read_text()) != os.getpid()
    monkeypatch.setattr(report_refresh, "REPORT_INTERVAL_S", 0.0)
    refresher.submit((tmp_path / "c",))  # due: drawn at once, by a new worker (flush ended the last)
    refresher.submit((tmp_path / "d",), force=True)  # forced: after the one being drawn
    assert (tmp_path / "c").exists()
    refresher.flush()
    assert int((tmp_path / "d").read_text()) != os.getpid() and said == []


def test_a_report_that_cannot_be_drawn_is_told_and_the_run_goes_on(tmp_path):
    said: list[str] = []
    refresher = ReportRefresher(said.append, _fails)
    refresher.submit((tmp_path,), force=True)
    refresher.flush()
    assert said == ["report.html not written: ValueError: no plot"]


def test_without_a_worker_process_the_run_draws_the_report(tmp_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError("no processes left")

    monkeypatch.setattr(report_refresh, "ProcessPoolExecutor", no_process)
    said: list[str] = []
    refresher = ReportRefresher(said.append, _pid_to)
    refresher.submit((tmp_path / "a",), force=True)
    assert int((tmp_path / "a").read_text()) == os.getpid()
    assert len(said) == 1 and "no worker process (no processes left)" in said[0]
