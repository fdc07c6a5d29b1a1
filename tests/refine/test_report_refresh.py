"""report.html's refresher: reports drawn in a worker process, held back by the interval, the latest one drawn at the
end, a failure told in one line and the run going on, and the run's process drawing where no worker starts."""

import os
from pathlib import Path

from cryorefine import worker_process
from cryorefine.refine import report_refresh
from cryorefine.refine.report_refresh import ReportRefresher


def _pid_to(path):  # module-level: the worker imports it by name
    Path(path).write_text(str(os.getpid()))


def _pid_and_report_loaded(path, wait_s):  # a figure's job: which process drew it, with the report loaded or not
    import sys
    import time

    start = time.time()
    time.sleep(wait_s)  # long enough that the other worker takes the next job
    return os.getpid(), "cryorefine.report" in sys.modules, start, time.time()


def _two_figures(args):  # parts: the report split in two jobs, the page (their results) written by the run's process
    (path,) = args

    def write(results):
        Path(path).write_text(repr([*results, os.getpid()]))

    return [(_pid_and_report_loaded, path, 1.0), (_pid_and_report_loaded, path, 1.0)], write


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


def test_the_last_report_is_drawn_by_the_prepared_workers_side_by_side(tmp_path):
    """prepare() starts a worker and the first submit the others, each loading the report's modules as it starts; the
    last (forced) report's figures are drawn one per worker and its page written by the run's process. A refresh is
    one job (``draw``)."""
    refresher = ReportRefresher(print, _pid_to, _two_figures, workers=2)
    refresher.prepare()
    refresher.submit((tmp_path / "last",), force=True)
    refresher.flush()
    (pid1, loaded1, start1, end1), (pid2, loaded2, start2, end2), writer = eval((tmp_path / "last").read_text())
    assert loaded1 and loaded2 and writer == os.getpid() and len({pid1, pid2, writer}) == 3
    assert start2 < end1 and start1 < end2  # side by side
    one_worker = ReportRefresher(print, _pid_to, _two_figures, workers=1)
    one_worker.submit((tmp_path / "whole",), force=True)  # one worker: the whole report in one job
    one_worker.flush()
    assert int((tmp_path / "whole").read_text()) != os.getpid()


def test_a_report_that_cannot_be_drawn_is_told_and_the_run_goes_on(tmp_path):
    said: list[str] = []
    refresher = ReportRefresher(said.append, _fails)
    refresher.submit((tmp_path,), force=True)
    refresher.flush()
    assert said == ["report.html not written: ValueError: no plot"]


def test_without_a_worker_process_the_run_draws_the_report(tmp_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError("no processes left")

    monkeypatch.setattr(worker_process, "ProcessPoolExecutor", no_process)
    said: list[str] = []
    refresher = ReportRefresher(said.append, _pid_to)
    refresher.submit((tmp_path / "a",), force=True)
    assert int((tmp_path / "a").read_text()) == os.getpid()
    assert len(said) == 1 and "no worker process (no processes left)" in said[0]


def _ends_the_worker(path):
    if int(os.environ.get("REPORT_TEST_PARENT", "0")) != os.getpid():  # in the worker: end it as a kill would
        os._exit(1)
    _pid_to(path)


def test_a_worker_that_ends_leaves_the_reports_to_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("REPORT_TEST_PARENT", str(os.getpid()))
    said: list[str] = []
    refresher = ReportRefresher(said.append, _ends_the_worker)
    refresher.submit((tmp_path / "a",), force=True)
    refresher.submit((tmp_path / "b",), force=True)
    refresher.flush()
    assert int((tmp_path / "a").read_text()) == os.getpid() == int((tmp_path / "b").read_text())
    assert said == ["report.html drawn in the run's process: its worker process ended"]


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
with open({runs!r}, "a") as f:  # the script's top level, without a main guard
    f.write(str(os.getpid()) + "\\n")
from cryorefine.refine.report_refresh import ReportRefresher
from test_report_refresh import _pid_to
r = ReportRefresher(print, _pid_to)
r.submit(({drawn!r},), force=True)
r.flush()
"""


def test_a_script_without_a_main_guard_is_not_run_again_by_the_worker(tmp_path):
    """multiprocessing's spawn runs a script's top level again in a new process unless it is guarded: a user's
    script calling cryorefine would start its work over in the report's worker."""
    import subprocess
    import sys

    runs, drawn = tmp_path / "runs", tmp_path / "drawn"
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), runs=str(runs), drawn=str(drawn)))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (pid,) = runs.read_text().split()  # the top level ran once: in the script's process
    assert int(drawn.read_text()) != int(pid)  # the report drawn by the worker
