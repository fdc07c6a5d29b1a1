"""The bad-input corpus: a tiny valid project, one corruption per case, and the command lines that must refuse it.

Used by tests/cli/test_bad_inputs.py (every case must stop with one line naming the file and the fix, exit code
!= 0, no traceback, earlier outputs byte-identical) and by bench/bad_inputs.py (writes the messages to
bench/results/bad_inputs.md).

The project (the working directory): data/particles.star + data/particles.mrcs + data/truth.mrc (16³ map,
8 particles, 4 Å/px, from `simulate_particles`), the same particles as a cryoSPARC project data/P1 (J7/extract/*.mrc
stacks, J9/J9_particles.cs), and out/ holding earlier outputs of each command (PREEXISTING).
"""

import contextlib
import io
import shutil
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import mrcfile
import numpy as np
import torch
from cs_project import make_cs_project, write_cs

from cryorefine.cli.main import main
from cryorefine.io.mrc import write_map
from cryorefine.io.star import read_star, write_star
from cryorefine.simulate import simulate_particles

BOX, ANGPIX, N = 16, 4.0, 8
CS = "data/P1/J9/J9_particles.cs"
PREEXISTING = {  # earlier outputs in out/, one per command; a failed start must leave them byte-identical
    "run_it001_data.star": b"# a previous refine's output; must survive a failed start\ndata_particles\n",
    "map.mrc": b"a previous reconstruct's map; must survive a failed start\n",
    "particles.star": b"# a previous convert's output; must survive a failed start\ndata_particles\n",
}
DEFAULTS = {
    "particles": "data/particles.star",
    "ref": "data/truth.mrc",
    "out": "out",
    "sym": "C1",
    "diameter": "40",
    "continue": None,
}


def command_line(command: str, opts: dict) -> list[str]:
    """argv of `command` for the logical options `opts` (DEFAULTS overridden; convert reads the .cs by default)."""
    o = {**DEFAULTS, **({"particles": CS} if command == "convert" else {}), **opts}
    if command == "reconstruct":
        return ["reconstruct", "--i", o["particles"], "--o", f"{o['out']}/map.mrc", "--ctf"]
    if command == "convert":
        return ["convert", o["particles"], f"{o['out']}/particles.star"]
    if o["continue"]:
        return [command, "--continue", o["continue"], "--o", f"{o['out']}/run"]
    diameter = [] if o["diameter"] is None else ["--particle_diameter", o["diameter"]]
    return [command, "--i", o["particles"], "--ref", o["ref"], "--o", f"{o['out']}/run", *diameter, "--sym", o["sym"]]


@dataclass
class Case:
    corrupt: Callable | None = None  # corrupt(project folder)
    opts: dict = field(default_factory=dict)
    names: str | None = None  # the offending file the message must name (None: a flag, no file)
    commands: tuple = ("refine",)
    patch: Callable | None = None  # a context manager to run under (e.g. a full disk)


# ------------------------------------------------------------------ the project


def make_base(folder) -> Path:
    """The valid project's data/ folder, built once in ``folder``/data (image names data/particles.mrcs, relative to
    the project directory as simulate writes them)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = torch.meshgrid(*(torch.arange(BOX, dtype=torch.float32) - BOX // 2,) * 3, indexing="ij")
    truth = torch.exp(-((x - 1) ** 2 + y**2 + (z + 2) ** 2) / 8.0)
    with contextlib.chdir(folder):
        simulate_particles(truth, ANGPIX, Path("data"), n=N, snr=0)
    make_cs_project(folder / "data", folder / "data" / "P1")
    return folder / "data"


def make_project(base, folder) -> Path:
    """A fresh copy of the valid project in `folder` (then the working directory), with earlier outputs."""
    folder = Path(folder)
    shutil.copytree(base, folder / "data")
    (folder / "out").mkdir()
    for name, content in PREEXISTING.items():
        (folder / "out" / name).write_bytes(content)
    return folder


def outputs_untouched(project) -> bool:
    out = Path(project) / "out"
    return sorted(f.name for f in out.iterdir()) == sorted(PREEXISTING) and all(
        (out / name).read_bytes() == content for name, content in PREEXISTING.items()
    )


def run(argv, patch=None) -> tuple[int, str]:
    """(exit code, stderr) of the command-line entry point, in this process."""
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        patch() if patch else contextlib.nullcontext(),
    ):
        rc = main(argv)
    return rc, err.getvalue()


# ------------------------------------------------------------------ corruptions


def stack_data(p, name="data/particles.mrcs"):
    with mrcfile.open(p / name) as m:
        return np.array(m.data)


def rewrite_stack(p, data, name="data/particles.mrcs"):
    path = p / name
    path.unlink()
    with mrcfile.new(path) as m:  # plain mrcfile, so NaN/Inf and odd shapes go in unchecked
        m.set_data(np.asarray(data, np.float32))
        m.set_image_stack()
        m.voxel_size = ANGPIX


def edit_particles(p, column, values):
    star = p / "data" / "particles.star"
    blocks = read_star(star)
    if values is None:
        blocks["particles"] = blocks["particles"].drop(columns=[column])
    else:
        blocks["particles"][column] = values
    write_star(star, blocks)


def poison(value):
    def corrupt(p):
        data = stack_data(p)
        data[2, 5, 7] = value
        rewrite_stack(p, data)

    return corrupt


def truncate(path, keep_bytes):
    def corrupt(p):
        data = (p / path).read_bytes()
        (p / path).write_bytes(data[:keep_bytes])

    return corrupt


def garbage(path):
    def corrupt(p):
        (p / path).unlink()
        (p / path).write_bytes(b"\x00\x01 this is not what the name says " * 64)

    return corrupt


def edit_cs(change):
    def corrupt(p):
        cs = np.load(p / CS)
        fields = {name: cs[name] for name in cs.dtype.names}
        change(fields)
        write_cs(p / CS, fields)

    return corrupt


def cs_nan_pose(fields):
    fields["alignments3D/pose"][3, 1] = np.nan


def cs_index_past_end(fields):
    fields["blob/idx"][5] = 40


def micrograph_cs(fields):
    for name in [n for n in fields if n.startswith("blob/")]:
        del fields[name]


def saved_state(content: bytes):
    def corrupt(p):
        (p / "data" / "old").mkdir()
        (p / "data" / "old" / "run_it001_optimiser.star").write_text("data_optimiser_general\n_rlnCurrentIteration 1\n")
        (p / "data" / "old" / "run_it001_state.pt").write_bytes(content)

    return corrupt


def state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def disk_full():
    usage = namedtuple("usage", "total used free")
    return mock.patch.object(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))


PARTICLE_COMMANDS = ("refine", "reconstruct")
CS_COMMANDS = ("refine", "reconstruct", "convert")
CASES = {
    "missing STAR": Case(opts={"particles": "data/nope.star"}, names="data/nope.star", commands=PARTICLE_COMMANDS),
    "empty STAR": Case(
        lambda p: (p / "data" / "particles.star").write_text(""),
        names="data/particles.star",
        commands=PARTICLE_COMMANDS,
    ),
    "malformed STAR": Case(
        lambda p: (p / "data" / "particles.star").write_text("data_\nloop_\n_rlnImageName #1\n_x\nnot a star\x00\n"),
        names="data/particles.star",
        commands=PARTICLE_COMMANDS,
    ),
    "STAR without rlnImageName": Case(
        lambda p: edit_particles(p, "rlnImageName", None), names="data/particles.star", commands=PARTICLE_COMMANDS
    ),
    "missing stack": Case(
        lambda p: (p / "data" / "particles.mrcs").unlink(), names="particles.mrcs", commands=PARTICLE_COMMANDS
    ),
    "short stack": Case(
        lambda p: rewrite_stack(p, stack_data(p)[:5]), names="particles.mrcs", commands=PARTICLE_COMMANDS
    ),
    "index 0 in rlnImageName": Case(
        lambda p: edit_particles(p, "rlnImageName", [f"{i:06d}@particles.mrcs" for i in range(N)]),
        names="data/particles.star",
        commands=PARTICLE_COMMANDS,
    ),
    "index past the end of the stack": Case(
        lambda p: edit_particles(p, "rlnImageName", [f"{i + 5:06d}@particles.mrcs" for i in range(N)]),
        names="particles.mrcs",
        commands=PARTICLE_COMMANDS,
    ),
    "rlnRandomSubset mixing 0 with 1 and 2": Case(
        lambda p: edit_particles(p, "rlnRandomSubset", [1, 2, 0, 1, 2, 1, 2, 0]), names="data/particles.star"
    ),
    "NaN pixels": Case(poison(np.nan), names="particles.mrcs", commands=PARTICLE_COMMANDS),
    "Inf pixels": Case(poison(np.inf), names="particles.mrcs", commands=PARTICLE_COMMANDS),
    "non-square images": Case(
        lambda p: rewrite_stack(p, np.zeros((N, BOX, BOX + 2))), names="particles.mrcs", commands=PARTICLE_COMMANDS
    ),
    "malformed MRC stack": Case(garbage("data/particles.mrcs"), names="particles.mrcs", commands=PARTICLE_COMMANDS),
    "truncated MRC stack": Case(
        truncate("data/particles.mrcs", 1024 + 3 * BOX * BOX * 4), names="particles.mrcs", commands=PARTICLE_COMMANDS
    ),
    "pixel size STAR vs map": Case(
        lambda p: write_map(p / "data" / "truth.mrc", np.zeros((BOX,) * 3, np.float32), ANGPIX * 1.05),
        names="data/truth.mrc",
    ),
    "missing reference": Case(opts={"ref": "data/nope.mrc"}, names="data/nope.mrc"),
    "reference box != particle box": Case(
        lambda p: write_map(p / "data" / "truth.mrc", np.zeros((BOX + 2,) * 3, np.float32), ANGPIX),
        names="data/truth.mrc",
    ),
    "non-cubic map": Case(
        lambda p: write_map(p / "data" / "truth.mrc", np.zeros((BOX, BOX, BOX + 2), np.float32), ANGPIX),
        names="data/truth.mrc",
    ),
    "NaN in map": Case(
        lambda p: write_map(p / "data" / "truth.mrc", np.full((BOX,) * 3, np.nan, np.float32), ANGPIX),
        names="data/truth.mrc",
    ),
    "malformed MRC reference": Case(garbage("data/truth.mrc"), names="data/truth.mrc"),
    "unknown symmetry X9": Case(opts={"sym": "X9"}),
    "no --particle_diameter": Case(opts={"diameter": None}),
    "zero diameter": Case(opts={"diameter": "0"}),
    "negative diameter": Case(opts={"diameter": "-10"}),
    "diameter larger than the box": Case(opts={"diameter": "100"}),
    "unwritable output folder": Case(
        lambda p: (p / "blocker").write_text("a regular file"),
        opts={"out": "blocker"},
        names="blocker",
        commands=CS_COMMANDS,
    ),
    "disk full": Case(patch=disk_full, names="out", commands=CS_COMMANDS),
    "missing --continue file": Case(
        opts={"continue": "out/run_it007_optimiser.star"}, names="run_it007_optimiser.star"
    ),
    "unreadable --continue state": Case(
        saved_state(b"\x80\x02 half a pickle"),
        opts={"continue": "data/old/run_it001_optimiser.star"},
        names="run_it001_optimiser.star",
    ),
    "--continue state whose maps are gone": Case(
        saved_state(state_bytes({"maps": {"mrc": ["run_it001_half1_class001.mrc"]}, "config": {}})),
        opts={"continue": "data/old/run_it001_optimiser.star"},
        names="run_it001_half1_class001.mrc",
    ),
    "missing .cs": Case(opts={"particles": "data/P1/J9/nope.cs"}, names="nope.cs", commands=CS_COMMANDS),
    ".cs that is not a numpy file": Case(
        garbage(CS), opts={"particles": CS}, names="J9_particles.cs", commands=CS_COMMANDS
    ),
    ".cs without particle images": Case(
        edit_cs(micrograph_cs), opts={"particles": CS}, names="J9_particles.cs", commands=CS_COMMANDS
    ),
    ".cs with a NaN pose": Case(
        edit_cs(cs_nan_pose), opts={"particles": CS}, names="J9_particles.cs", commands=CS_COMMANDS
    ),
    ".cs whose stack is missing": Case(
        lambda p: (p / "data/P1/J7/extract/stack_1.mrc").unlink(),
        opts={"particles": CS},
        names="J7/extract/stack_1.mrc",
        commands=CS_COMMANDS,
    ),
    ".cs index past the end of the stack": Case(
        edit_cs(cs_index_past_end), opts={"particles": CS}, names="stack_1.mrc", commands=CS_COMMANDS
    ),
}
RUNS = [(name, command) for name, case in CASES.items() for command in case.commands]
