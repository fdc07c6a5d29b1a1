"""Bad inputs to `cryorefine refine`, `reconstruct` and `convert`: one line on stderr naming the file and the fix,
exit code 2, no traceback, earlier outputs byte-identical. The cases are in bad_input_cases.py; the message
each prints is in bench/results/bad_inputs.md (bench/bad_inputs.py writes it)."""

import pytest
import torch
from bad_input_cases import CASES, CS, RUNS, command_line, disk_full, make_base, make_project, outputs_untouched, run

from cryorefine.cli.main import build_parser
from cryorefine.validate import validate_refine_inputs


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture
def project(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_project(base, tmp_path)


def check_one_line_error(rc, err, command, names, project):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cryorefine {command}: error:"), err
    if names is not None:
        assert names in lines[0], err
    assert outputs_untouched(project)
    return lines[0]


@pytest.mark.parametrize("case, command", RUNS, ids=[f"{c}-{cmd}" for c, cmd in RUNS])
def test_bad_input_gives_one_line(case, command, project):
    c = CASES[case]
    if c.corrupt is not None:
        c.corrupt(project)
    rc, err = run(command_line(command, c.opts), c.patch)
    check_one_line_error(rc, err, command, c.names, project)


@pytest.mark.parametrize("particles", ["data/particles.star", CS])
@pytest.mark.parametrize("command", ["refine", "classify"])
def test_valid_inputs_pass_validation(project, particles, command):
    validate_refine_inputs(build_parser().parse_args(command_line(command, {"particles": particles})))
    assert outputs_untouched(project)


@pytest.mark.parametrize("command", ["reconstruct", "convert"])
def test_valid_inputs_run(project, command):
    (project / "new").mkdir()
    rc, err = run(command_line(command, {"particles": CS, "out": "new"}))
    assert rc == 0, err
    assert outputs_untouched(project)


def test_output_folder_is_created_and_kept_for_valid_inputs(project):
    validate_refine_inputs(build_parser().parse_args(command_line("refine", {"out": "new/sub"})))
    assert (project / "new" / "sub").is_dir() and not any((project / "new" / "sub").iterdir())


def test_created_output_folder_removed_when_disk_is_full(project):
    assert run(command_line("refine", {"out": "new/sub"}), disk_full)[0] == 2
    assert not (project / "new").exists()


@pytest.mark.parametrize(
    "exc, words",
    [
        (
            OSError(28, "No space left on device", "out/run_it002_data.star"),
            ["out/run_it002_data.star", "No space left"],
        ),
        (PermissionError(13, "Permission denied", "out"), ["out", "Permission denied"]),
        (OSError(30, "Read-only file system", "out/run.log"), ["out/run.log", "Read-only"]),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text"), ["--batch", "GPU"]),
    ],
)
def test_run_time_errors_give_one_line(exc, words, project, monkeypatch):
    import cryorefine.cli.refine as refine_cli

    def failing_main(args):
        raise exc

    monkeypatch.setattr(refine_cli, "main", failing_main)
    rc, err = run(command_line("refine", {}))
    line = check_one_line_error(rc, err, "refine", None, project)
    assert all(w in line for w in words), line
