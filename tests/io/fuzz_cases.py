"""Seeded fuzz cases over the STAR, MRC and cryoSPARC .cs readers, run through the command line as a user runs them.

Used by tests/io/test_fuzz_inputs.py (a few hundred cases, in this process) and bench/fuzz_inputs.py (1000 cases, each
in a fresh process). One case: a fresh copy of a tiny valid project (built once by `build_base`), one seeded mutation
of one input file, one command that reads it:

    star   data/particles.star  (RELION 3.1, from `cryorefine simulate`)  cryorefine reconstruct --i it
    stack  data/particles.mrcs  (its image stack)                         cryorefine reconstruct --i the STAR file
    map    data/truth.mrc       (16³ map)                                 cryorefine fsc it data/half.mrc
    cs     data/P1/J9/J9_particles.cs (tests/cs_project.py)               cryorefine convert it, or reconstruct --i it

The contract (`check`): no Python traceback; exit code 0 with the outputs written and readable (a finite map, a STAR
file that loads), or exit code 2 with exactly one line on stderr that names the mutated file; the earlier outputs in
out/ (one valid output of each command, written before) byte-identical unless the run succeeded, and then only the
command's own outputs changed. A mutation that must be refused (`expect == "error"`: an index 0, a missing
rlnImageName, a truncated stack...) and runs to exit code 0 is reported as accepted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np

from cryorefine.io.cryosparc import REQUIRED_FIELDS

BOX, ANGPIX, N = 16, 4.0, 8
STAR = "data/particles.star"
STACK = "data/particles.mrcs"
MAP = "data/truth.mrc"
HALF = "data/half.mrc"
CS = "data/P1/J9/J9_particles.cs"
CS_STACKS = ("data/P1/J7/extract/stack_0.mrc", "data/P1/J7/extract/stack_1.mrc")
TARGET = {"star": STAR, "stack": STACK, "map": MAP, "cs": CS}
OUTPUTS = {  # the files each command writes (under out/), which a successful run may replace
    "reconstruct": ("map.mrc",),
    "fsc": ("fsc.star",),
    "convert": ("particles.star", "particles_stacks"),
}
READER_WEIGHTS = {"star": 0.35, "stack": 0.2, "map": 0.15, "cs": 0.3}
TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class Case:
    index: int
    seed: int
    reader: str  # star, stack, map, cs
    kind: str  # the mutation (a key of MUTATIONS[reader])
    command: str  # reconstruct, fsc, convert

    @property
    def target(self) -> str:
        return TARGET[self.reader]

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index, 1])


def make_cases(n: int, seed: int = 0) -> list[Case]:
    """n cases: reader by READER_WEIGHTS, then a mutation kind of that reader, each with equal weight."""
    readers = list(READER_WEIGHTS)
    weights = np.array(list(READER_WEIGHTS.values()))
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        reader = readers[int(rng.choice(len(readers), p=weights / weights.sum()))]
        kinds = list(MUTATIONS[reader])
        kind = kinds[int(rng.integers(len(kinds)))]
        command = {"star": "reconstruct", "stack": "reconstruct", "map": "fsc"}.get(reader) or (
            "convert" if rng.random() < 0.5 else "reconstruct"
        )
        cases.append(Case(i, seed, reader, kind, command))
    return cases


def argv_for(case: Case) -> list[str]:
    if case.command == "fsc":
        return ["fsc", MAP, HALF, "--o", "out/fsc.star"]
    if case.command == "convert":
        return ["convert", CS, "out/particles.star"]
    particles = CS if case.reader == "cs" else STAR
    return ["reconstruct", "--i", particles, "--o", "out/map.mrc", "--ctf", "--skip_gridding"]


# ------------------------------------------------------------------ the valid project


@contextlib.contextmanager
def working_directory(folder):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def build_base(folder) -> Path:
    """The valid project (data/) and one valid output of each command (out/), made through the command line."""
    from cs_project import make_cs_project

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with working_directory(folder):
        sim = ["simulate", "--o", "data", "--n", str(N), "--box", str(BOX), "--angpix", str(ANGPIX), "--snr", "1"]
        _must_run(sim)
        with mrcfile.open(MAP) as m:
            truth = np.array(m.data)
        noise = np.random.default_rng(1).normal(scale=0.1 * float(truth.std()), size=truth.shape)
        with mrcfile.new(HALF) as m:
            m.set_data((truth + noise).astype(np.float32))
            m.voxel_size = ANGPIX
        make_cs_project("data", "data/P1")
        Path("out").mkdir()
        for case in (
            Case(0, 0, "star", "", "reconstruct"),
            Case(0, 0, "map", "", "fsc"),
            Case(0, 0, "cs", "", "convert"),
        ):
            _must_run(argv_for(case))
    return folder


def _must_run(argv) -> None:
    rc, _, err = run_in_process(argv)
    if rc != 0:
        raise RuntimeError(f"cryorefine {' '.join(argv)} failed on the valid project: {err}")


def make_project(base, folder) -> Path:
    """A fresh copy of the valid project and its earlier outputs in `folder`."""
    folder = Path(folder)
    shutil.copytree(base, folder, symlinks=True, dirs_exist_ok=True)
    return folder


def snapshot(folder) -> dict:
    """{path under folder: file bytes, link target or 'dir'}."""
    folder = Path(folder)
    snap = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            snap[key] = ("link", os.readlink(p))
        elif p.is_dir():
            snap[key] = ("dir",)
        else:
            snap[key] = ("file", p.read_bytes())
    return snap


# ------------------------------------------------------------------ STAR mutations

# A STAR file as [block name, column labels, rows of text tokens]: the seed's layout (write_star's), loops only.
Block = list


def parse_star(text: str) -> list[Block]:
    blocks: list[Block] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("data_"):
            blocks.append([s[5:], [], []])
        elif s.startswith("_") and blocks:
            blocks[-1][1].append(s.split()[0][1:])
        elif s and not s.startswith(("#", "loop_")) and blocks:
            blocks[-1][2].append(s.split())
    return blocks


def star_text(blocks: list[Block]) -> str:
    lines = ["", "# version 30001", ""]
    for name, columns, rows in blocks:
        lines += [f"data_{name}", "", "loop_"] + [f"_{c} #{i}" for i, c in enumerate(columns, 1)]
        lines += ["\t".join(r) for r in rows] + ["", ""]
    return "\n".join(lines)


def _edit_star(p: Path, edit: Callable[[dict], str]) -> str:
    blocks = parse_star((p / STAR).read_text())
    detail = edit({b[0]: b for b in blocks})
    (p / STAR).write_text(star_text(blocks))
    return detail


def _set_column(block: Block, column: str, values) -> None:
    j = block[1].index(column)
    for row, v in zip(block[2], values):
        row[j] = v


def _rows(rng, n: int) -> list[int]:
    """One row, or all of them."""
    return list(range(n)) if rng.random() < 0.3 else [int(rng.integers(n))]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def star_truncate(p, rng):
    data = (p / STAR).read_bytes()
    k = int(rng.integers(0, len(data)))
    (p / STAR).write_bytes(data[:k])
    return f"truncated to {k} of {len(data)} bytes", "any"


def _flip(path: Path, rng, lo=0, hi=None, n_max=4) -> str:
    data = bytearray(path.read_bytes())
    hi = len(data) if hi is None else min(hi, len(data))
    where = sorted(int(x) for x in rng.integers(lo, hi, size=int(rng.integers(1, n_max + 1))))
    for w in where:
        data[w] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))
    return f"bytes flipped at {where}"


def star_byte_flip(p, rng):
    return _flip(p / STAR, rng), "any"


PARTICLE_NUMERIC = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnOpticsGroup",
    "rlnRandomSubset",
)
OPTICS_NUMERIC = (
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
NOT_NUMBERS = ("abc", '""', "nan", "NaN", "inf", "-inf", "1e", "--1", "1,5", "0x1F", "None", "1.2.3", "true")


def star_not_a_number(p, rng):
    """Text, an empty string, NaN or Inf in a numeric column (rows keep their token count)."""

    def edit(b):
        block = "optics" if rng.random() < 0.3 else "particles"
        column = _pick(rng, OPTICS_NUMERIC if block == "optics" else PARTICLE_NUMERIC)
        value = _pick(rng, NOT_NUMBERS)
        rows = _rows(rng, len(b[block][2]))
        for r in rows:
            b[block][2][r][b[block][1].index(column)] = value
        return f"{column} of data_{block} rows {rows} = {value}"

    return _edit_star(p, edit), "error"


def star_empty_field(p, rng):
    """A value left out of a row (the row has one token too few)."""

    def edit(b):
        block = "optics" if rng.random() < 0.3 else "particles"
        r = int(rng.integers(len(b[block][2])))
        j = int(rng.integers(len(b[block][1])))
        del b[block][2][r][j]
        return f"data_{block} row {r} lost {b[block][1][j]}"

    return _edit_star(p, edit), "error"


def star_extra_field(p, rng):
    def edit(b):
        block = "optics" if rng.random() < 0.3 else "particles"
        r = int(rng.integers(len(b[block][2])))
        b[block][2][r].append(_pick(rng, ("1", "abc", "0.5")))
        return f"data_{block} row {r} has an extra value"

    return _edit_star(p, edit), "error"


def star_image_index(p, rng):
    value = _pick(rng, ("0", "-1", str(10**12), "9", "1.5", "", "abc", "1e3", "000000", str(2**63), "+2"))
    expect = "ok" if value == "+2" else "error"

    def edit(b):
        rows = _rows(rng, N)
        names = [b["particles"][2][r][b["particles"][1].index("rlnImageName")] for r in rows]
        j = b["particles"][1].index("rlnImageName")
        for r, name in zip(rows, names):
            b["particles"][2][r][j] = f"{value}@{name.partition('@')[2]}"
        return f"rlnImageName index {value!r} in rows {rows}"

    return _edit_star(p, edit), expect


def star_image_stack_name(p, rng):
    """The stack part of rlnImageName: missing, a folder, the STAR file itself, absolute and missing, with ':mrcs'."""
    options = {
        "missing.mrcs": "error",
        "data": "error",
        STAR: "error",
        "/nonexistent/particles.mrcs": "error",
        f"{STACK}:mrcs": "ok",
        "/": "error",
        "": "error",
        "@": "error",
    }
    stack, expect = _pick(rng, list(options.items()))

    def edit(b):
        rows = _rows(rng, N)
        j = b["particles"][1].index("rlnImageName")
        for r in rows:
            index = b["particles"][2][r][j].partition("@")[0]
            b["particles"][2][r][j] = f"{index}@{stack}"
        return f"rlnImageName stack {stack!r} in rows {rows}"

    return _edit_star(p, edit), expect


NUMBERS = {  # column: (values, expect) — huge, negative, zero, non-integer
    ("optics", "rlnImagePixelSize"): (("0", "-4", "1e30", "1e-30", "1e300", "4.0000001", "2"), "any"),
    ("optics", "rlnImageSize"): (("0", "-16", "8", "32", "15", str(10**12), "16.5", "17"), "any"),
    ("optics", "rlnVoltage"): (("0", "-300", "1e30", "1e-30", "1e300"), "any"),
    ("optics", "rlnSphericalAberration"): (("0", "-2.7", "1e30", "1e300"), "any"),
    ("optics", "rlnAmplitudeContrast"): (("0", "-0.1", "1", "1.5", "1e30"), "any"),
    ("optics", "rlnOpticsGroup"): (("0", "-1", "2", str(10**12), "1.5", str(2**63)), "any"),
    ("particles", "rlnOpticsGroup"): (("0", "-1", "2", str(10**12), "1.5", str(2**63)), "any"),
    ("particles", "rlnDefocusU"): (("0", "-15000", "1e30", "1e300", "-1e300"), "any"),
    ("particles", "rlnDefocusV"): (("0", "-15000", "1e30", "1e300"), "any"),
    ("particles", "rlnDefocusAngle"): (("-720", "1e30", "1e300"), "any"),
    ("particles", "rlnPhaseShift"): (("-720", "1e30", "1e300"), "any"),
    ("particles", "rlnAngleRot"): (("-720", "1e30", "1e300", "-1e300"), "any"),
    ("particles", "rlnAngleTilt"): (("-720", "1e30", "1e300"), "any"),
    ("particles", "rlnAnglePsi"): (("1e30", "1e300"), "any"),
    ("particles", "rlnOriginXAngst"): (("1e6", "1e30", "1e300", "-1e300"), "any"),
    ("particles", "rlnOriginYAngst"): (("1e30", "1e300"), "any"),
    ("particles", "rlnRandomSubset"): (("0", "3", "-1", str(10**12), "1.5"), "any"),
}


def star_number(p, rng):
    """Huge, negative, zero or non-integer numbers, one row or the whole column."""
    block, column = _pick(rng, list(NUMBERS))
    values, expect = NUMBERS[(block, column)]
    value = _pick(rng, values)

    def edit(b):
        rows = _rows(rng, len(b[block][2]))
        for r in rows:
            b[block][2][r][b[block][1].index(column)] = value
        return f"{column} of data_{block} rows {rows} = {value}"

    return _edit_star(p, edit), expect


def star_renumber_optics(p, rng):
    """The optics group renumbered in both blocks (consistent: a valid file)."""
    value = _pick(rng, ("0", "-1", "7", str(10**12), str(2**62)))

    def edit(b):
        _set_column(b["optics"], "rlnOpticsGroup", [value])
        _set_column(b["particles"], "rlnOpticsGroup", [value] * N)
        return f"optics group numbered {value}"

    return _edit_star(p, edit), "ok"


STAR_COLUMNS = {
    "particles": ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnOpticsGroup", "rlnAngleRot", "rlnOriginXAngst"),
    "optics": (
        "rlnOpticsGroup",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnOpticsGroupName",
    ),
}
MISSING_OK = {
    ("particles", "rlnDefocusV"),
    ("particles", "rlnOpticsGroup"),  # one optics group
    ("particles", "rlnAngleRot"),
    ("particles", "rlnOriginXAngst"),
    ("optics", "rlnImageSize"),  # read from the stack
    ("optics", "rlnOpticsGroupName"),
}


def star_missing_column(p, rng):
    block = _pick(rng, list(STAR_COLUMNS))
    column = _pick(rng, STAR_COLUMNS[block])

    def edit(b):
        j = b[block][1].index(column)
        del b[block][1][j]
        for row in b[block][2]:
            del row[j]
        return f"{column} removed from data_{block}"

    return _edit_star(p, edit), "ok" if (block, column) in MISSING_OK else "error"


def star_duplicate_column(p, rng):
    block = _pick(rng, list(STAR_COLUMNS))
    column = _pick(rng, STAR_COLUMNS[block])
    differ = rng.random() < 0.5

    def edit(b):
        j = b[block][1].index(column)
        b[block][1].append(column)
        for row in b[block][2]:
            row.append("7" if differ and column != "rlnImageName" else row[j])
        return f"{column} twice in data_{block}" + (" (different values)" if differ else "")

    return _edit_star(p, edit), "any"


def star_empty_loop(p, rng):
    which = _pick(rng, ("particles", "optics", "both"))

    def edit(b):
        for name in ("particles", "optics") if which == "both" else (which,):
            b[name][2].clear()
        return f"empty loop: {which}"

    return _edit_star(p, edit), "error"


def star_blocks(p, rng):
    """Blocks dropped, duplicated, renamed or swapped; the RELION 3.0 layout (one block, optics per particle)."""
    what = _pick(rng, ("no optics", "no particles", "particles twice", "renamed", "optics last", "star 3.0"))
    optics, particles = parse_star((p / STAR).read_text())
    blocks = {
        "no optics": [particles],
        "no particles": [optics],
        "particles twice": [optics, particles, particles],
        "renamed": [optics, ["images", particles[1], particles[2]]],
        "optics last": [particles, optics],
    }.get(what)
    if blocks is None:  # RELION 3.0: the optics columns on every particle row, one block
        o_cols, o_row = optics[1], optics[2][0]
        keep = [c for c in o_cols if c not in ("rlnOpticsGroup", "rlnOpticsGroupName", "rlnImageDimensionality")]
        rows = [row + [o_row[o_cols.index(c)] for c in keep] for row in particles[2]]
        blocks = [["", particles[1] + keep, rows]]
    (p / STAR).write_text(star_text(blocks))
    expect = {"no optics": "error", "no particles": "error", "renamed": "ok", "optics last": "ok", "star 3.0": "ok"}
    return what, expect.get(what, "any")


NON_ASCII = ("é", "\u00a0", "\u2212", "\U0001f600", "\ufeff", "µ")
RAW_BYTES = (b"\xff", b"\xe9", b"\x00", b"\xc3", b"\xef\xbb\xbf", b"\x80\x81")


def star_non_ascii(p, rng):
    """Non-ASCII text in a label, a block name or a value (UTF-8), or raw non-UTF-8 bytes anywhere."""
    where = _pick(rng, ("label", "block", "value", "image name", "raw bytes", "BOM"))
    if where == "raw bytes":
        data = (p / STAR).read_bytes()
        k = int(rng.integers(len(data)))
        raw = _pick(rng, RAW_BYTES)
        (p / STAR).write_bytes(data[:k] + raw + data[k:])
        return f"bytes {raw!r} inserted at {k}", "any"
    if where == "BOM":
        (p / STAR).write_bytes(b"\xef\xbb\xbf" + (p / STAR).read_bytes())
        return "UTF-8 byte order mark", "any"
    text = _pick(rng, NON_ASCII)

    def edit(b):
        block = "optics" if rng.random() < 0.3 else "particles"
        j = int(rng.integers(len(b[block][1])))
        if where == "label":
            b[block][1][j] += text
        elif where == "block":
            b[block][0] += text
        elif where == "value":
            r = int(rng.integers(len(b[block][2])))
            b[block][2][r][j] = text
        else:
            col = b["particles"][1].index("rlnImageName")
            r = int(rng.integers(N))
            b["particles"][2][r][col] = b["particles"][2][r][col].replace("particles", "partícles" + text)
        return f"{text!r} in a {where}"

    return _edit_star(p, edit), "any"


def star_line_endings(p, rng):
    """CRLF or CR line ends, tabs as spaces, comments between rows (RELION reads these)."""
    how = _pick(rng, ("crlf", "spaces", "comments"))
    text = (p / STAR).read_text()
    if how == "crlf":
        (p / STAR).write_bytes(text.replace("\n", "\r\n").encode())
    elif how == "spaces":
        (p / STAR).write_text(text.replace("\t", "   "))
    else:
        (p / STAR).write_text(text.replace("\n000004@", "\n# a comment\n000004@"))
    return how, "ok"


def star_swap_labels(p, rng):
    """Two labels of a loop swapped (the values now under the wrong names)."""

    def edit(b):
        block = "optics" if rng.random() < 0.3 else "particles"
        i, j = (int(x) for x in rng.choice(len(b[block][1]), 2, replace=False))
        cols = b[block][1]
        cols[i], cols[j] = cols[j], cols[i]
        return f"{cols[j]} and {cols[i]} swapped in data_{block}"

    return _edit_star(p, edit), "any"


# ------------------------------------------------------------------ MRC mutations (stacks and maps)

HEADER = 1024
FIELDS = {  # name: (offset, numpy type, values)
    "nx": (0, "<i4", (0, -1, 1, 8, 15, 17, 32, 2**31 - 1)),
    "ny": (4, "<i4", (0, -1, 1, 8, 15, 17, 32, 2**31 - 1)),
    "nz": (8, "<i4", (0, -1, 1, 7, 9, 17, 10**6, 2**31 - 1)),
    "mode": (12, "<i4", (-1, 0, 1, 3, 4, 5, 6, 7, 12, 100, 101, 2**31 - 1)),
    "mx": (28, "<i4", (0, -1, 1, 2**31 - 1)),
    "mz": (36, "<i4", (0, -1, 1, 2**31 - 1)),
    "cella.x": (40, "<f4", (0.0, -64.0, 1e30, 1e-30, np.nan, np.inf, 3e38)),
    "cella.z": (48, "<f4", (0.0, -64.0, np.nan)),
    "mapc": (64, "<i4", (0, 2, 3, 4, -1)),
    "maps": (72, "<i4", (1, 2, 0, 9)),
    "ispg": (88, "<i4", (0, 1, 401, -1, 10**6)),
    "nsymbt": (92, "<i4", (-1, 4, 80, 1024, 2**31 - 1)),
    "nversion": (108, "<i4", (0, -1, 20140, 99999)),
    "origin.x": (196, "<f4", (1e30, np.nan, -np.inf)),
    "nlabl": (220, "<i4", (-1, 11, 10**6)),
}
STAMPS = {  # name: (offset, values)
    "map": (208, (b"XXXX", b"\0\0\0\0", b"map ", b"MAP\0")),
    "machst": (212, (b"\x11\x11\0\0", b"\x11\x11\x11\x11", b"\0\0\0\0", b"\xff\xff\xff\xff")),
    "exttyp": (104, (b"CCP4", b"MRCO", b"SERI", b"FEI1", b"\xff\xfe\0\0")),
}


def _mrc_read(path):
    with mrcfile.open(path, permissive=True) as m:
        return np.array(m.data), float(m.voxel_size.x), bool(m.is_image_stack())


def _mrc_write(path, data, angpix, stack, extended=None):
    path.unlink()
    with mrcfile.new(path) as m:
        m.set_data(data)
        if extended is not None:
            m.set_extended_header(extended)
        if stack:
            m.set_image_stack()
        m.voxel_size = angpix


def mrc_truncate(path, rng):
    data = path.read_bytes()
    k = int(rng.integers(0, HEADER)) if rng.random() < 0.4 else int(rng.integers(HEADER, len(data)))
    path.write_bytes(data[:k])
    return f"truncated to {k} of {len(data)} bytes", "error"


def mrc_flip_header(path, rng):
    return _flip(path, rng, 0, 224, 2), "any"


def mrc_flip_data(path, rng):
    return _flip(path, rng, HEADER, None, 4), "any"


def mrc_header_field(path, rng):
    name = _pick(rng, list(FIELDS))
    offset, dtype, values = FIELDS[name]
    value = _pick(rng, values)
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = np.array([value], dtype).tobytes()
    path.write_bytes(bytes(data))
    return f"header {name} = {value}", "any"


def mrc_stamp(path, rng):
    name = _pick(rng, list(STAMPS))
    offset, values = STAMPS[name]
    value = _pick(rng, values)
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = value
    path.write_bytes(bytes(data))
    return f"header {name} = {value!r}", "any"


SWAPPED_WORDS = [*range(0, 96, 4), 108, 196, 200, 204, 216, 220]


def mrc_big_endian(path, rng):
    """The whole file in big-endian byte order (machine stamp 0x11 0x11): a valid MRC; or only the stamp or only
    the data swapped (a wrong endianness)."""
    how = _pick(rng, ("consistent", "consistent", "stamp only", "header only"))
    data = bytearray(path.read_bytes())
    if how in ("consistent", "header only"):
        for off in SWAPPED_WORDS:
            data[off : off + 4] = data[off : off + 4][::-1]
    data[212:216] = b"\x11\x11\0\0"
    if how == "consistent":
        body = np.frombuffer(bytes(data[HEADER:]), "<f4")
        data[HEADER:] = body.astype(">f4").tobytes()
    path.write_bytes(bytes(data))
    return f"big-endian: {how}", "ok" if how == "consistent" else "any"


def mrc_mode(path, rng):
    """The same images stored in mode 0 (int8), 1 (int16), 6 (uint16) or 12 (float16) (a valid file)."""
    dtype = _pick(rng, (np.int8, np.int16, np.uint16, np.float16))
    data, angpix, stack = _mrc_read(path)
    scaled = data / max(float(np.abs(data).max()), 1e-30) * (100 if dtype == np.int8 else 1000)
    if dtype == np.uint16:
        scaled = scaled + 1000
    _mrc_write(path, scaled.astype(dtype), angpix, stack)
    return f"mode of {np.dtype(dtype).name}", "ok"


def mrc_extended_header(path, rng):
    """An extended header: written properly (valid), or its size (nsymbt) set without the bytes (the data is
    short of what the header says), or the bytes without nsymbt."""
    how = _pick(rng, ("valid", "nsymbt only", "bytes only"))
    size = int(_pick(rng, (80, 1024, 4096)))
    if how == "valid":
        data, angpix, stack = _mrc_read(path)
        _mrc_write(path, data, angpix, stack, extended=np.zeros(size, np.uint8) + 7)
        return f"extended header of {size} bytes", "ok"
    raw = bytearray(path.read_bytes())
    if how == "nsymbt only":
        raw[92:96] = np.array([size], "<i4").tobytes()
    else:
        raw[HEADER:HEADER] = bytes(size)
    path.write_bytes(bytes(raw))
    return f"extended header {how} ({size} bytes)", "any"


def mrc_length(path, rng):
    """The file shorter (a few bytes to a whole image) or longer than its header says."""
    data = path.read_bytes()
    k = int(_pick(rng, (1, 3, 4, BOX * 4, BOX * BOX * 4, BOX * BOX * 4 + 8)))
    if rng.random() < 0.6:
        path.write_bytes(data[:-k])
        return f"{k} bytes short", "error"
    path.write_bytes(data + bytes(k))
    return f"{k} bytes too long", "any"


def mrc_nan(path, rng):
    data = bytearray(path.read_bytes())
    k = HEADER + 4 * int(rng.integers((len(data) - HEADER) // 4))
    data[k : k + 4] = np.array([_pick(rng, (np.nan, np.inf, -np.inf))], "<f4").tobytes()
    path.write_bytes(bytes(data))
    return f"NaN/Inf at byte {k}", "error"


def mrc_shape(path, rng):
    """Images or map of another (consistent) shape: fewer or more images, not square, not cubic, 2D, 4 boxes."""
    data, angpix, stack = _mrc_read(path)
    how = _pick(rng, ("fewer", "more", "not square", "2D", "bigger box", "one image"))
    if how == "fewer":
        data = data[: len(data) // 2]
    elif how == "more":
        data = np.concatenate([data, data])
    elif how == "not square":
        data = data[:, :, : BOX - 2]
    elif how == "2D":
        data = data[0]
    elif how == "bigger box":
        data = np.pad(data, 2)
    else:
        data = data[:1]
    _mrc_write(path, np.ascontiguousarray(data), angpix, stack and data.ndim == 3)
    return f"shape {how} {data.shape}", "any"


MRC_MUTATIONS = {
    "truncate": mrc_truncate,
    "byte flip header": mrc_flip_header,
    "byte flip data": mrc_flip_data,
    "header field": mrc_header_field,
    "stamp": mrc_stamp,
    "endianness": mrc_big_endian,
    "mode": mrc_mode,
    "extended header": mrc_extended_header,
    "file length": mrc_length,
    "NaN": mrc_nan,
    "shape": mrc_shape,
}


def _on(target: str, mutation):
    return lambda p, rng: mutation(p / target, rng)


# ------------------------------------------------------------------ .cs mutations


def _cs_fields(p) -> dict:
    cs = np.load(p / CS)
    return {name: np.array(cs[name]) for name in cs.dtype.names}


def _cs_write(p, fields: dict) -> None:
    from cs_project import write_cs

    write_cs(p / CS, fields)


def _npy_header_end(data: bytes) -> int:
    major = data[6]
    if major == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


def cs_truncate(p, rng):
    data = (p / CS).read_bytes()
    end = _npy_header_end(data)
    k = int(rng.integers(0, end)) if rng.random() < 0.3 else int(rng.integers(end, len(data)))
    (p / CS).write_bytes(data[:k])
    return f"truncated to {k} of {len(data)} bytes (payload from {end})", "error"


def cs_flip_header(p, rng):
    data = (p / CS).read_bytes()
    return _flip(p / CS, rng, 0, _npy_header_end(data), 2), "any"


def cs_flip_payload(p, rng):
    data = (p / CS).read_bytes()
    return _flip(p / CS, rng, _npy_header_end(data), None, 4), "any"


def cs_missing_field(p, rng):
    fields = _cs_fields(p)
    name = _pick(rng, list(fields))
    del fields[name]
    _cs_write(p, fields)
    if name == "ctf/df1_A":  # no CTF: convert writes it so, reconstruct --ctf refuses it
        return f"{name} removed", "any"
    return f"{name} removed", "error" if name in REQUIRED_FIELDS else "ok"


def _wrong_dtypes(name: str, v: np.ndarray) -> list:
    n = len(v)
    common = [
        v.astype(np.float64) + 0.5 if v.dtype.kind in "iuf" else np.arange(n, dtype=np.float64) + 0.5,
        np.array([b"abc"] * n, "S3"),
        np.array(["été"] * n, "U3"),
        np.full(n, True),
        (v.astype(np.complex64) if v.dtype.kind in "iuf" else np.zeros(n, np.complex64)),
        np.array([None] * n, object),
        np.zeros((n, 3), v.dtype) if v.ndim == 1 else np.zeros(n, v.dtype),
    ]
    if name == "blob/path":
        common += [np.arange(n), np.array([b"\xff\xfeJ7"] * n, "S8"), np.array([s.decode() for s in v], "U64")]
    if v.dtype.kind in "iu":
        common += [v.astype(np.int8) - 1, v.astype(np.float32), v.astype(np.uint64) + np.uint64(2**63)]
    return common


def cs_wrong_dtype(p, rng):
    fields = _cs_fields(p)
    name = _pick(rng, [f for f in fields if f != "uid"])
    options = _wrong_dtypes(name, fields[name])
    k = int(rng.integers(len(options)))
    fields[name] = options[k]
    _cs_write(p, fields)
    expect = "ok" if name == "blob/path" and k == len(options) - 1 else "any"  # str paths are still paths
    return f"{name} as {options[k].dtype}{options[k].shape[1:]}", expect


CS_VALUES = {  # field: values (one row or all), expect
    "blob/idx": ((-1, 4, 8, 10**12, 2**32 - 1), "error"),
    "blob/psize_A": ((0.0, -4.0, 1e30, 1e-30, np.nan, np.inf), "any"),
    "blob/shape": (((32, 32), (8, 8), (0, 0), (16, 8), (-1, -1)), "any"),
    "ctf/accel_kv": ((0.0, -300.0, 1e30), "any"),
    "ctf/cs_mm": ((-2.7, 1e30, np.nan), "any"),
    "ctf/amp_contrast": ((-0.1, 1.0, 1.5, 1e30), "any"),
    "ctf/df1_A": ((0.0, -1e4, 1e30, np.inf), "any"),
    "ctf/df_angle_rad": ((1e30, -np.inf), "any"),
    "ctf/exp_group_id": ((0, 2**32 - 1), "ok"),
    "alignments3D/pose": ((1e30, 1e-30, np.nan, 100.0), "any"),
    "alignments3D/shift": ((1e30, -1e6, np.nan), "any"),
    "alignments3D/psize_A": ((0.0, -1.0, 1e30), "any"),
    "alignments3D/split": ((2, 5, 2**32 - 1), "any"),
}


def cs_value(p, rng):
    fields = _cs_fields(p)
    name = _pick(rng, list(CS_VALUES))
    values, expect = CS_VALUES[name]
    value = values[int(rng.integers(len(values)))]
    rows = _rows(rng, N)
    v = fields[name]
    if v.dtype.kind in "iu" and (np.asarray(value) < 0).any():
        v = v.astype(np.int64)
    if v.dtype.kind in "iu" and np.asarray(value).max() > np.iinfo(v.dtype).max:
        v = v.astype(np.uint64)
    v[rows] = value
    fields[name] = v
    _cs_write(p, fields)
    if name == "blob/idx" and value == 4 and all(int(fields["blob/idx"][r]) < 4 for r in range(N) if r not in rows):
        expect = "error"
    return f"{name} rows {rows} = {value}", expect


def cs_not_a_table(p, rng):
    how = _pick(rng, ("floats", "2D table", "0-d table", "objects", "empty table", "strings"))
    fields = _cs_fields(p)
    if how == "empty table":
        _cs_write(p, {k: v[:0] for k, v in fields.items()})
        return how, "error"
    from cs_project import write_cs

    write_cs(p / CS, fields)
    cs = np.load(p / CS)
    arr: np.ndarray
    if how == "floats":
        arr = np.zeros((N, 3))
    elif how == "2D table":
        arr = cs.reshape(2, N // 2)
    elif how == "0-d table":
        arr = cs[0].copy().reshape(())
    elif how == "objects":
        arr = np.array([{"blob/path": "x"}] * N, object)
    else:
        arr = np.array(["blob/path"] * N)
    with open(p / CS, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    return how, "error"


def cs_header_lies(p, rng):
    """The .npy header's shape larger or smaller than the payload, or its dtype another."""
    data = (p / CS).read_bytes()
    end = _npy_header_end(data)
    header = data[:end].decode("latin1")
    how = _pick(rng, ("more rows", "fewer rows", "fortran", "bad dict", "version 3"))
    if how == "more rows":
        new = header.replace(f"({N},)", f"({N + 1},)")
    elif how == "fewer rows":
        new = header.replace(f"({N},)", f"({N - 3},)")
    elif how == "fortran":
        new = header.replace("'fortran_order': False", "'fortran_order': True")
    elif how == "bad dict":
        new = header.replace("'descr'", "'desc'")
    else:
        new = header
        data = data[:6] + b"\x03" + data[7:]
    pad = len(header) - len(new)
    new = new[:-1] + " " * pad + "\n" if pad >= 0 else new
    (p / CS).write_bytes(new.encode("latin1") + data[end:] if how != "version 3" else data)
    return how, {"more rows": "error", "fewer rows": "ok", "fortran": "ok"}.get(how, "any")


def cs_blob_path(p, rng):
    """blob/path: absent stack, empty, absolute, a folder, the .cs itself, a '>' prefix (valid), non-UTF-8."""
    options = {
        b"J7/extract/missing.mrc": "error",
        b"": "error",
        b"/nonexistent/stack_0.mrc": "error",
        b"J7/extract": "error",
        b"J9/J9_particles.cs": "error",
        b">J7/extract/stack_0.mrc": "ok",
        b"J7/extract/st\xffck.mrc": "error",
        b"../../../../../../../../etc/passwd": "error",
    }
    value, expect = _pick(rng, list(options.items()))
    fields = _cs_fields(p)
    rows = _rows(rng, N)
    if value.startswith(b">J7"):
        rows = [r for r in range(N) if fields["blob/path"][r].endswith(b"stack_0.mrc")]
    v = fields["blob/path"].astype("S64")
    v[rows] = value
    fields["blob/path"] = v
    _cs_write(p, fields)
    return f"blob/path rows {rows} = {value!r}", expect


def cs_stack(p, rng):
    """The cryoSPARC stack a .cs points to, mutated like a particle stack."""
    stack = _pick(rng, CS_STACKS)
    kind = _pick(rng, ("truncate", "header field", "endianness", "file length", "NaN", "mode"))
    detail, expect = MRC_MUTATIONS[kind](p / stack, rng)
    return f"{stack}: {kind}: {detail}", expect, stack


MUTATIONS: dict[str, dict[str, Callable]] = {
    "star": {
        "truncate": star_truncate,
        "byte flip": star_byte_flip,
        "not a number": star_not_a_number,
        "empty field": star_empty_field,
        "extra field": star_extra_field,
        "image index": star_image_index,
        "image stack name": star_image_stack_name,
        "number": star_number,
        "renumbered optics": star_renumber_optics,
        "missing column": star_missing_column,
        "duplicate column": star_duplicate_column,
        "empty loop": star_empty_loop,
        "blocks": star_blocks,
        "non-ASCII": star_non_ascii,
        "line endings": star_line_endings,
        "swapped labels": star_swap_labels,
    },
    "stack": {k: _on(STACK, f) for k, f in MRC_MUTATIONS.items()},
    "map": {k: _on(MAP, f) for k, f in MRC_MUTATIONS.items()},
    "cs": {
        "truncate": cs_truncate,
        "byte flip header": cs_flip_header,
        "byte flip payload": cs_flip_payload,
        "missing field": cs_missing_field,
        "wrong dtype": cs_wrong_dtype,
        "value": cs_value,
        "not a table": cs_not_a_table,
        "npy header lies": cs_header_lies,
        "blob/path": cs_blob_path,
        "stack": cs_stack,
    },
}


def mutate(case: Case, project: Path) -> tuple[str, str, str]:
    """Apply the case's mutation to the project: (what was done, expect: 'error', 'ok' or 'any', the file that an
    error message must name)."""
    with working_directory(project):
        detail, expect, *offending = MUTATIONS[case.reader][case.kind](project, case.rng())
    return detail, expect, offending[0] if offending else case.target


# ------------------------------------------------------------------ running and checking


def run_in_process(argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cryorefine ARGV` in this process, as a fresh interpreter would print them:
    an uncaught exception is a traceback and exit code 1; warnings are shown once per place (Python's defaults)."""
    from cryorefine.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, None) for w in caught)
    return int(rc), out.getvalue(), shown + err.getvalue()


def run_in_subprocess(argv, timeout: float = 120) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m cryorefine.cli.main ARGV` (the working directory is this one's)."""
    import subprocess

    try:
        p = subprocess.run(
            [sys.executable, "-m", "cryorefine.cli.main", *argv], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        return -9, "", f"timed out after {timeout} s: {exc}"
    return p.returncode, p.stdout, p.stderr


def outputs_valid(command: str, project: Path, stdout: str) -> str | None:
    """None if the command's outputs are there and readable, else what is wrong."""
    from cryorefine.errors import CryoInputError
    from cryorefine.io.mrc import read_map
    from cryorefine.io.particles import load_particles
    from cryorefine.io.star import read_star

    try:
        summary = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"no JSON summary on stdout: {stdout[-200:]!r}"
    try:
        with working_directory(project):
            if command == "reconstruct":
                data, angpix = read_map("out/map.mrc")
                if data.shape[0] != summary["box"] or not (np.isfinite(angpix) and angpix > 0):
                    return f"map of box {data.shape[0]}, {angpix} Å/px; summary {summary}"
                if summary["n_particles"] < 1:
                    return f"no particles: {summary}"
            elif command == "fsc":
                blocks = read_star("out/fsc.star")
                fsc = blocks["fsc"]["rlnFourierShellCorrelation"].to_numpy(np.float64)
                if len(fsc) != summary["box"] // 2 + 1 or not np.isfinite(fsc).all():
                    return f"FSC curve of {len(fsc)} shells, finite: {np.isfinite(fsc).all()}; summary {summary}"
            else:
                table = load_particles("out/particles.star")
                if len(table) != summary["particles"]:
                    return f"{len(table)} particles in the STAR file, summary {summary}"
                table.close()
    except (CryoInputError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def outputs_kept(command: str, before: dict, after: dict, succeeded: bool) -> bool:
    """Earlier outputs byte-identical (a successful run may replace its own outputs only)."""
    if not succeeded:
        return before == after
    own = OUTPUTS[command]
    keep = lambda snap: {k: v for k, v in snap.items() if k.split(os.sep)[0] not in own}  # noqa: E731
    return keep(before) == keep(after)


def check(
    case: Case, rc: int, stdout: str, stderr: str, before: dict, after: dict, project: Path, offending: str
) -> dict:
    """The contract for one run; 'ok' is True when every part holds."""
    lines = stderr.strip().splitlines()
    r = {
        "rc": rc,
        "traceback": TRACEBACK in stderr,
        "one_line": None,
        "names_file": None,
        "result_error": None,
        "outputs_kept": outputs_kept(case.command, before["out"], after["out"], rc == 0),
    }
    if rc == 0:
        r["result_error"] = outputs_valid(case.command, project, stdout)
    elif rc == 2:
        r["one_line"] = len(lines) == 1 and lines[0].startswith(f"cryorefine {case.command}: error: ")
        r["names_file"] = bool(lines) and Path(offending).name in lines[-1]
    r["message"] = lines[-1] if rc == 2 and lines else stderr.strip()[-2000:]
    r["stderr"] = stderr[-3000:]
    r["ok"] = (
        not r["traceback"]
        and r["outputs_kept"]
        and ((rc == 0 and r["result_error"] is None) or (rc == 2 and bool(r["one_line"]) and bool(r["names_file"])))
    )
    return r


def run_case(case: Case, base: Path, folder: Path, runner: Callable = run_in_process) -> dict:
    """Copy the project to `folder`, mutate it, run the command there and check the contract."""
    project = make_project(base, folder)
    detail, expect, offending = mutate(case, project)
    before = {"out": snapshot(project / "out")}
    t0 = time.perf_counter()
    with working_directory(project):
        rc, stdout, stderr = runner(argv_for(case))
    seconds = time.perf_counter() - t0
    after = {"out": snapshot(project / "out")}
    r = check(case, rc, stdout, stderr, before, after, project, offending)
    r["accepted"] = expect == "error" and rc == 0
    r["rejected_valid"] = expect == "ok" and rc != 0
    return {**asdict(case), "argv": argv_for(case), "detail": detail, "expect": expect, "seconds": seconds, **r}


def problems(result: dict) -> list[str]:
    """What is wrong with one case's result (empty: as it should be)."""
    out = []
    if result["traceback"]:
        out.append("traceback")
    if result["rc"] not in (0, 2):
        out.append(f"exit code {result['rc']}")
    if result["rc"] == 2 and not result["one_line"]:
        out.append("not one line")
    if result["rc"] == 2 and not result["names_file"]:
        out.append("file not named")
    if result["rc"] == 0 and result["result_error"]:
        out.append("bad result")
    if not result["outputs_kept"]:
        out.append("damaged output")
    if result["accepted"]:
        out.append("bad input accepted")
    if result["rejected_valid"]:
        out.append("valid input refused")
    return out
