"""The background writer: STAR files' text made in a worker process on request, the same bytes as made in the run's
process, and made there where no worker can start."""

import os

import numpy as np
import pandas as pd

from cryorefine import worker_process
from cryorefine.io.background import BackgroundWriter, StarTextInProcess, side_by_side
from cryorefine.io import star
from cryorefine.io.star import write_star_table


def _pid_text(blocks):  # module-level: the worker imports it by name
    return str(os.getpid())


def _blocks():
    n = 500
    rng = np.random.default_rng(1)
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Particles/a b.mrcs" for i in range(n)],
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnClassNumber": np.ones(n, np.int64),
        }
    )
    return {"general": {"rlnName": "x y", "rlnSmall": 2.5e-8}, "particles": particles}


def test_star_files_written_through_the_worker_are_the_same_bytes(tmp_path):
    write_star_table(tmp_path / "here.star", _blocks())
    makers = []

    def job(path):
        makers.append(star.TEXT_MAKER.get())
        write_star_table(path, _blocks())

    writer = BackgroundWriter(star_in_process=True)
    writer.submit(job, tmp_path / "worker.star")
    writer.close()
    assert isinstance(makers[0], StarTextInProcess)  # the writer's jobs make their text through the worker
    assert (tmp_path / "worker.star").read_bytes() == (tmp_path / "here.star").read_bytes()
    assert star.TEXT_MAKER.get() is None  # and only they


def test_the_text_is_made_in_another_process_else_here(monkeypatch):
    made = StarTextInProcess(_pid_text)
    assert int(made({})) != os.getpid()
    made.close()

    def no_process(*args, **kwargs):
        raise OSError("no processes left")

    monkeypatch.setattr(worker_process, "ProcessPoolExecutor", no_process)
    made = StarTextInProcess(_pid_text)
    assert int(made({})) == os.getpid() == int(made({}))


def test_prepare_starts_the_worker_that_makes_the_first_text(monkeypatch):
    made = StarTextInProcess(_pid_text)
    made.prepare()
    started = set(made._pool._processes)  # the worker process prepare() started, before any text was asked for
    assert len(started) == 1 and int(made({})) in started
    made.close()

    def no_process(*args, **kwargs):
        raise OSError("no processes left")

    monkeypatch.setattr(worker_process, "ProcessPoolExecutor", no_process)
    made = StarTextInProcess(_pid_text)
    made.prepare()  # no worker: the text is made here
    assert int(made({})) == os.getpid()


def _pid_or_raises(blocks):
    if blocks:
        raise NotImplementedError("a RuntimeError of the text itself")
    return str(os.getpid())


def test_an_error_of_the_text_itself_is_raised_and_the_worker_kept():
    import pytest

    made = StarTextInProcess(_pid_or_raises)
    with pytest.raises(NotImplementedError):
        made({"x": {}})
    assert int(made({})) != os.getpid()  # still the worker's
    made.close()


def test_files_side_by_side_run_at_once_with_the_callers_text_maker(tmp_path):
    """The last iteration's files: jobs in several threads, each seeing the writer's STAR text maker; a failing job's
    error raised once the others have written theirs. One thread: in order, here."""
    import threading

    import pytest

    both = threading.Barrier(2, timeout=10)  # two jobs that can only finish together
    seen, order = [], []

    def job(name):
        def run():
            if name != "third":
                both.wait()
            seen.append(star.TEXT_MAKER.get())
            if name == "fails":
                raise ValueError("disk says no")
            write_star_table(tmp_path / f"{name}.star", _blocks())

        return run

    token = star.TEXT_MAKER.set(star.star_text)
    try:
        with pytest.raises(ValueError, match="disk says no"):
            side_by_side([job("fails"), job("written"), job("third")], threads=3)
    finally:
        star.TEXT_MAKER.reset(token)
    assert (
        seen == [star.star_text] * 3 and (tmp_path / "written.star").is_file() and (tmp_path / "third.star").is_file()
    )
    side_by_side([lambda n=n: order.append(n) for n in range(5)], threads=1)
    assert order == list(range(5))


def test_a_star_file_for_several_paths_has_its_text_made_once(tmp_path):
    made = []

    def maker(blocks):
        made.append(1)
        return star.star_text(blocks)

    token = star.TEXT_MAKER.set(maker)
    try:
        write_star_table([tmp_path / "a.star", tmp_path / "b.star"], _blocks())
    finally:
        star.TEXT_MAKER.reset(token)
    write_star_table(tmp_path / "one.star", _blocks())
    assert made == [1]
    assert (
        (tmp_path / "a.star").read_bytes() == (tmp_path / "b.star").read_bytes() == (tmp_path / "one.star").read_bytes()
    )
