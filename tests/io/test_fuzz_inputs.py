"""Fuzzed STAR, MRC and cryoSPARC .cs inputs through the command line: no traceback; exit 0 with readable outputs, or
exit 2 with one line naming the mutated file; earlier outputs byte-identical unless the run succeeded.

The cases and the contract are fuzz_cases.py's; here CASES of them run in this process (`cryorefine.cli.main.main`),
two in real subprocesses (what a user's stderr shows when an MRC header is read anyway). bench/fuzz_inputs.py runs
1000, each in a fresh process, and writes the summary to bench/results.
"""

import mrcfile
import numpy as np
import pytest
from fuzz_cases import (
    MAP,
    MUTATIONS,
    TRACEBACK,
    Case,
    argv_for,
    build_base,
    check,
    make_cases,
    make_project,
    problems,
    run_case,
    run_in_subprocess,
    snapshot,
    working_directory,
)

from cryorefine.errors import CryoInputError

N_CASES, SEED = 400, 20261204
CASES = make_cases(N_CASES, SEED)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("fuzz") / "base")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.index}-{c.reader}-{c.kind.replace(' ', '_')}" for c in CASES])
def test_fuzzed_input(case, base, tmp_path):
    r = run_case(case, base, tmp_path / "project")
    assert not problems(r), f"{r['detail']} (expect {r['expect']}): {problems(r)}, exit {r['rc']}\n{r['stderr']}"


def test_cases_cover_every_mutation():
    assert {(c.reader, c.kind) for c in CASES} == {(r, k) for r, kinds in MUTATIONS.items() for k in kinds}
    assert {c.command for c in CASES if c.reader == "cs"} == {"convert", "reconstruct"}


def test_checker_flags_what_breaks_the_contract(tmp_path):
    case = Case(0, 0, "star", "truncate", "reconstruct")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "map.mrc").write_bytes(b"earlier")
    before = {"out": snapshot(tmp_path / "out")}
    crash = f"{TRACEBACK}:\n  File ...\nValueError: x\n"
    assert check(case, 1, "", crash, before, before, tmp_path, "data/particles.star")["traceback"]
    two_lines = "a warning\ncryorefine reconstruct: error: data/particles.star: bad\n"
    assert not check(case, 2, "", two_lines, before, before, tmp_path, "data/particles.star")["one_line"]
    other_file = "cryorefine reconstruct: error: data/particles.mrcs: bad\n"
    assert not check(case, 2, "", other_file, before, before, tmp_path, "data/particles.star")["names_file"]
    (tmp_path / "out" / "map.mrc").write_bytes(b"half written")
    after = {"out": snapshot(tmp_path / "out")}
    assert not check(case, 2, "", other_file, before, after, tmp_path, "data/particles.star")["outputs_kept"]
    assert check(case, 0, "{}", "", before, after, tmp_path, "data/particles.star")["result_error"]


def _blank_map_id(path):
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"    "  # no 'MAP ' ID, as some old programs write: read anyway, with a warning
    path.write_bytes(bytes(raw))


def test_warning_then_error_is_one_line_in_a_real_process(base, tmp_path):
    """A map read anyway (its header not standard) and then refused (not cubic): the user sees the error line only."""
    project = make_project(base, tmp_path / "project")
    with mrcfile.open(project / MAP) as m:
        data = np.array(m.data)
    (project / MAP).unlink()
    with mrcfile.new(project / MAP) as m:
        m.set_data(np.ascontiguousarray(data[:, :, :8]))
    _blank_map_id(project / MAP)
    case = Case(0, 0, "map", "stamp", "fsc")
    before = {"out": snapshot(project / "out")}
    with working_directory(project):
        rc, out, err = run_in_subprocess(argv_for(case))
    r = check(case, rc, out, err, before, {"out": snapshot(project / "out")}, project, MAP)
    assert rc == 2 and r["one_line"] and r["names_file"] and r["outputs_kept"], err
    assert "not a cubic 3D map" in err


def test_warning_of_a_run_that_succeeds_is_shown(base, tmp_path):
    project = make_project(base, tmp_path / "project")
    _blank_map_id(project / MAP)
    with working_directory(project):
        rc, out, err = run_in_subprocess(argv_for(Case(0, 0, "map", "stamp", "fsc")))
    assert rc == 0 and "MRC header is not standard" in err and "truth.mrc" in err, err


def test_control_characters_in_a_message_stay_on_one_line():
    """A damaged file's bytes in a name (here a group separator and a carriage return) are escaped, not printed."""
    message = str(CryoInputError("image stack J7/st\x1dck\r.mrc not found", path="p.cs"))
    assert message.splitlines() == [message] and "st\\x1dck\\r.mrc" in message
