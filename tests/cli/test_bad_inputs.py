"""Bad inputs to `cryorefine refine`: one line on stderr naming the file and the fix, no traceback, nothing overwritten.

Each case builds a tiny valid set (16³ map, 8 particles, 4 Å/px), corrupts one thing and runs the
command-line entry point; `validate_refine_inputs` stops it before any heavy work. <tmp> is the
test's folder (the working directory); stack paths are printed absolute, as resolved.

All exit with code 2 and print exactly this one line on stderr:

| case | message |
|---|---|
| missing STAR | `cryorefine refine: error: data/nope.star: STAR file not found; check the path` |
| empty STAR | `cryorefine refine: error: data/particles.star: STAR file is empty` |
| malformed STAR | `cryorefine refine: error: data/particles.star: malformed STAR file (ValueError: Length mismatch: Expected axis has 3 elements, new values have 2 elements); check that it is a RELION/cryoSPARC STAR file` |
| STAR without rlnImageName | `cryorefine refine: error: data/particles.star: missing column rlnImageName in data_particles; add it or re-export the particles` |
| missing stack | `cryorefine refine: error: data/particles.star: image stack particles.mrcs not found as <tmp>/particles.mrcs (project directory) nor <tmp>/data/particles.mrcs (STAR file folder); run from the project directory or pass it` |
| short stack (index past the end) | `cryorefine refine: error: <tmp>/data/particles.mrcs: image 8 (1-based) is past the end of the stack, which holds 5 images; check rlnImageName` |
| NaN pixels | `cryorefine refine: error: <tmp>/data/particles.mrcs: image 3 (1-based) contains NaN or Inf pixels; re-extract the particles or drop it from the STAR file` |
| Inf pixels | `cryorefine refine: error: <tmp>/data/particles.mrcs: image 3 (1-based) contains NaN or Inf pixels; re-extract the particles or drop it from the STAR file` |
| non-square images | `cryorefine refine: error: <tmp>/data/particles.mrcs: images are not square (18 x 16 px); re-extract the particles with a square box` |
| pixel size STAR vs map | `cryorefine refine: error: data/truth.mrc: pixel size in the map header (4.2000 Å) differs from the particles' pixel size in the STAR file (4.0000 Å) by more than 1 %; rescale the reference or fix its header (relion_image_handler --angpix)` |
| missing reference | `cryorefine refine: error: data/nope.mrc: file not found; check the path` |
| reference box != particle box | `cryorefine refine: error: data/truth.mrc: reference box 18 px differs from the particle box 16 px; resample it to 16 px (relion_image_handler --new_box/--rescale_angpix)` |
| non-cubic map | `cryorefine refine: error: data/truth.mrc: not a cubic 3D map (shape (16, 16, 18)); give a cubic volume (resample/pad it, e.g. relion_image_handler --new_box)` |
| NaN in map | `cryorefine refine: error: data/truth.mrc: the map contains NaN or Inf values; fix or regenerate it` |
| unknown symmetry X9 | `cryorefine refine: error: unknown point group 'X9'; use C<n>, D<n>, T, O or I` |
| zero diameter | `cryorefine refine: error: --particle_diameter must be positive (got 0 Å); give the particle's longest dimension in Å, e.g. --particle_diameter 160` |
| negative diameter | `cryorefine refine: error: --particle_diameter must be positive (got -10 Å); give the particle's longest dimension in Å, e.g. --particle_diameter 160` |
| diameter larger than the box | `cryorefine refine: error: --particle_diameter 100 Å is larger than the box (16 px × 4 Å = 64.0 Å); give a smaller diameter` |
| unwritable output folder | `cryorefine refine: error: blocker: output folder cannot be created: blocker is a file, not a folder; choose another --o` |
| disk full | `cryorefine refine: error: out: not enough free disk space (1 MB free, 106 MB needed); free space or choose another output folder with --o` |
| run time: OSError ENOSPC (e.g. while writing an iteration) | `cryorefine refine: error: out/run_it002_data.star: No space left on device; free space or choose another output folder with --o` |
| run time: OSError EACCES | `cryorefine refine: error: out: Permission denied; make it accessible or choose another output folder with --o` |
| run time: OSError EROFS | `cryorefine refine: error: out/run.log: Read-only file system; choose another output folder with --o` |
| run time: torch.cuda.OutOfMemoryError | `cryorefine refine: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. ...); pass a smaller --batch (e.g. half the last one) or use a GPU with more memory` |
"""

import collections
import shutil

import mrcfile
import numpy as np
import pytest
import torch

from cryorefine.cli.main import build_parser, main
from cryorefine.io.mrc import write_map
from cryorefine.io.star import read_star, write_star
from cryorefine.simulate import simulate_particles
from cryorefine.validate import validate_refine_inputs

BOX, ANGPIX, N = 16, 4.0, 8
PREEXISTING = b"# a previous run's output; must survive a failed start\ndata_particles\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    truth = torch.zeros(BOX, BOX, BOX)
    z, y, x = torch.meshgrid(*(torch.arange(BOX, dtype=torch.float32) - BOX // 2,) * 3, indexing="ij")
    truth += torch.exp(-((x - 1) ** 2 + y ** 2 + (z + 2) ** 2) / 8.0)
    simulate_particles(truth, ANGPIX, d, n=N, snr=0)
    return d


@pytest.fixture
def project(base, tmp_path, monkeypatch):
    shutil.copytree(base, tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_it001_data.star").write_bytes(PREEXISTING)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refine_argv(**override):
    opts = {"--i": "data/particles.star", "--ref": "data/truth.mrc", "--o": "out/run",
            "--particle_diameter": "40", "--sym": "C1"}
    opts.update(override)
    return ["refine"] + [str(a) for k, v in opts.items() for a in (k, v)]


def stack_data(p):
    with mrcfile.open(p / "data" / "particles.mrcs") as m:
        return np.array(m.data)


def rewrite_stack(p, data):
    path = p / "data" / "particles.mrcs"
    path.unlink()
    with mrcfile.new(path) as m:  # plain mrcfile, so NaN/Inf and odd shapes go in unchecked
        m.set_data(np.asarray(data, np.float32))
        m.set_image_stack()
        m.voxel_size = ANGPIX


def drop_column(p, name):
    star = p / "data" / "particles.star"
    blocks = read_star(star)
    blocks["particles"] = blocks["particles"].drop(columns=[name])
    write_star(star, blocks)


def poison(value):
    def corrupt(p):
        data = stack_data(p)
        data[2, 5, 7] = value
        rewrite_stack(p, data)
    return corrupt


def fill_disk(monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 10 ** 6, 10 ** 6))


# name -> (corrupt(project), argv overrides, substring naming the offending file or None)
CASES = {
    "missing STAR": (None, {"--i": "data/nope.star"}, "data/nope.star"),
    "empty STAR": (lambda p: (p / "data" / "particles.star").write_text(""), {}, "data/particles.star"),
    "malformed STAR": (lambda p: (p / "data" / "particles.star").write_text("data_\nloop_\n_rlnImageName #1\n_x\nnot a star\x00\n"), {}, "data/particles.star"),
    "STAR without rlnImageName": (lambda p: drop_column(p, "rlnImageName"), {}, "data/particles.star"),
    "missing stack": (lambda p: (p / "data" / "particles.mrcs").unlink(), {}, "particles.mrcs"),
    "short stack (index past the end)": (lambda p: rewrite_stack(p, stack_data(p)[:5]), {}, "particles.mrcs"),
    "NaN pixels": (poison(np.nan), {}, "particles.mrcs"),
    "Inf pixels": (poison(np.inf), {}, "particles.mrcs"),
    "non-square images": (lambda p: rewrite_stack(p, np.zeros((N, BOX, BOX + 2))), {}, "particles.mrcs"),
    "pixel size STAR vs map": (lambda p: write_map(p / "data" / "truth.mrc", np.zeros((BOX,) * 3, np.float32), ANGPIX * 1.05), {}, "data/truth.mrc"),
    "missing reference": (None, {"--ref": "data/nope.mrc"}, "data/nope.mrc"),
    "reference box != particle box": (lambda p: write_map(p / "data" / "truth.mrc", np.zeros((BOX + 2,) * 3, np.float32), ANGPIX), {}, "data/truth.mrc"),
    "non-cubic map": (lambda p: write_map(p / "data" / "truth.mrc", np.zeros((BOX, BOX, BOX + 2), np.float32), ANGPIX), {}, "data/truth.mrc"),
    "NaN in map": (lambda p: write_map(p / "data" / "truth.mrc", np.full((BOX,) * 3, np.nan, np.float32), ANGPIX), {}, "data/truth.mrc"),
    "unknown symmetry X9": (None, {"--sym": "X9"}, None),
    "zero diameter": (None, {"--particle_diameter": "0"}, None),
    "negative diameter": (None, {"--particle_diameter": "-10"}, None),
    "diameter larger than the box": (None, {"--particle_diameter": "100"}, None),
    "unwritable output folder": (lambda p: (p / "blocker").write_text("a regular file"), {"--o": "blocker/run"}, "blocker"),
}


def check_one_line_error(rc, err, names, project):
    lines = err.strip().splitlines()
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("cryorefine refine: error:"), err
    if names is not None:
        assert names in lines[0], err
    out = project / "out"
    assert sorted(f.name for f in out.iterdir()) == ["run_it001_data.star"]
    assert (out / "run_it001_data.star").read_bytes() == PREEXISTING
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line(case, project, capsys):
    corrupt, override, names = CASES[case]
    if corrupt is not None:
        corrupt(project)
    capsys.readouterr()
    rc = main(refine_argv(**override))
    _, err = capsys.readouterr()
    check_one_line_error(rc, err, names, project)


def test_disk_full(project, capsys, monkeypatch):
    fill_disk(monkeypatch)
    rc = main(refine_argv())
    _, err = capsys.readouterr()
    line = check_one_line_error(rc, err, "out", project)
    assert "disk space" in line


def test_valid_inputs_pass_validation(project):
    args = build_parser().parse_args(refine_argv())
    validate_refine_inputs(args)
    assert sorted(f.name for f in (project / "out").iterdir()) == ["run_it001_data.star"]


def test_output_folder_is_created_and_kept_for_valid_inputs(project):
    args = build_parser().parse_args(refine_argv(**{"--o": "new/sub/run"}))
    validate_refine_inputs(args)
    assert (project / "new" / "sub").is_dir() and not any((project / "new" / "sub").iterdir())


def test_created_output_folder_removed_when_disk_is_full(project, monkeypatch, capsys):
    fill_disk(monkeypatch)
    assert main(refine_argv(**{"--o": "new/sub/run"})) == 2
    assert not (project / "new").exists()


@pytest.mark.parametrize("exc, words", [
    (OSError(28, "No space left on device", "out/run_it002_data.star"), ["out/run_it002_data.star", "No space left"]),
    (PermissionError(13, "Permission denied", "out"), ["out", "Permission denied"]),
    (OSError(30, "Read-only file system", "out/run.log"), ["out/run.log", "Read-only"]),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text"), ["--batch", "GPU"]),
])
def test_run_time_errors_give_one_line(exc, words, project, capsys, monkeypatch):
    import cryorefine.cli.refine as refine_cli

    def failing_main(args):
        raise exc

    monkeypatch.setattr(refine_cli, "main", failing_main)
    rc = main(refine_argv())
    _, err = capsys.readouterr()
    line = check_one_line_error(rc, err, None, project)
    assert all(w in line for w in words), line
