"""STAR files as {block name: pandas.DataFrame}; column names without the leading underscore."""

from __future__ import annotations

import linecache
import shlex
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryorefine.errors import CryoInputError
from cryorefine.io.atomic import atomic_write


def read_star(path) -> dict[str, pd.DataFrame]:
    """Read every data block; key/value blocks become one-row DataFrames."""
    path = Path(path)
    if not path.is_file():
        raise CryoInputError("STAR file not found; check the path", path=path)
    if path.stat().st_size == 0:
        raise CryoInputError("STAR file is empty", path=path)
    # starfile reads lines through linecache and clears it only after a successful parse: a failed parse would leave
    # this path's lines cached, and a later read of the same path in this process (the file fixed, or another file
    # under the same relative name) would parse the stale lines
    linecache.clearcache()
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on malformed input
        raise CryoInputError(
            _layout_problem(path)
            or f"malformed STAR file ({type(exc).__name__}: {exc}); check that it is a RELION/cryoSPARC STAR file",
            path=path,
        ) from exc
    if not blocks:
        raise CryoInputError(_not_text(path) or "STAR file holds no data_ blocks", path=path)
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and block.columns.duplicated().any():
            label = block.columns[block.columns.duplicated()][0]
            raise CryoInputError(f"column {label} appears twice in data_{name}; remove one of them", path=path)
    return {
        name: (block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])) for name, block in blocks.items()
    }


def _layout_problem(path: Path) -> str | None:
    """Where a STAR file that starfile could not parse breaks the layout (a loop_ row with more or fewer values than
    the loop has labels, a data_ block with nothing in it), or None."""
    block, block_line, labels, rows, in_loop = "", 0, 0, 0, False
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        s = line.strip()
        if s.startswith("data_"):
            if block and not (labels or rows):
                return f"{block} (line {block_line}) holds no loop_ or values; complete or remove it"
            block, block_line, labels, rows, in_loop = s.split()[0], number, 0, 0, False
        elif s.startswith("loop_"):
            in_loop = True
        elif s.startswith("_"):
            labels += 1
        elif s and not s.startswith("#") and in_loop:
            rows += 1
            try:
                values = len(shlex.split(s))
            except ValueError:  # an unclosed quote
                values = len(s.split())
            if values != labels:
                return (
                    f"line {number} has {values} values but the loop of {block} has {labels} labels; fix or remove "
                    "that row"
                )
    if block and not (labels or rows):
        return f"{block} (line {block_line}) holds no loop_ or values (is the file cut short?); complete or remove it"
    return None


def _not_text(path: Path) -> str | None:
    """What makes a file unreadable as text (starfile reads lines through linecache, which gives none for a file that
    is not UTF-8), or None."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, bad = data.count(b"\n", 0, exc.start) + 1, data[exc.start : exc.start + 4]
        return f"line {line} holds bytes that are not UTF-8 text ({bad!r}); save the STAR file as plain UTF-8 text"
    return None


def _as_block(block):
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):  # key/value ("general") block: keep plain python scalars
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in block.items()}
    raise TypeError(f"STAR block must be a DataFrame or dict, got {type(block).__name__}")


def _texts(values) -> list[str]:
    """String values as STAR text: quoted where empty or holding white space (one vectorised test for a whole column:
    a Python test per character held the interpreter lock the GPU-driving thread needs)."""
    text = pd.Series(values, dtype=object).astype(str)
    quote = text.eq("") | text.str.contains(r"\s", regex=True)
    return text.where(~quote, '"' + text + '"').tolist()


def _text(value) -> str:
    """One value as _texts writes it (without pandas: a key/value block's values, one by one)."""
    text = str(value)
    return f'"{text}"' if text == "" or any(c.isspace() for c in text) else text


def _float_format(values: np.ndarray) -> str:
    """RELION's fixed 6 decimals, unless a value is too small or large for them (then 9 significant digits)."""
    mag = np.abs(values[np.isfinite(values) & (values != 0)])
    return "%.6f" if mag.size == 0 or (mag.min() >= 1e-3 and mag.max() < 1e5) else "%.9g"


def _loop_rows(df: pd.DataFrame) -> list[str]:
    """The rows of a loop_ block, one %-format per row over whole columns.

    Written by hand because starfile formats every cell through pandas: 0.5-0.9 s for the 9,000-particle data.star
    of each iteration, in the writer thread, holding the interpreter lock the GPU-driving thread needs.
    """
    formats, columns = [], []
    for name in df.columns:
        col = df[name].to_numpy()
        if col.dtype.kind == "f":
            formats.append(_float_format(col))
            columns.append(col.tolist())
        elif col.dtype.kind in "iub":
            formats.append("%d")
            columns.append(col.astype(np.int64).tolist())
        else:  # strings (image names)
            formats.append("%s")
            columns.append(_texts(col))
    row = "\t".join(formats)
    return [row % values for values in zip(*columns)]


def _block_lines(name: str, block, rows: dict[int, list[str]]) -> list[str]:
    """A block's lines; a loop_ block's rows taken from ``rows`` (by the table's id) where the same table came before
    in this file, else formatted and kept there (model.star's per-group σ² tables: one table per optics group)."""
    lines = [f"data_{name}", ""]
    if isinstance(block, dict):
        for key, value in block.items():
            if isinstance(value, bool):
                value = int(value)
            text = (_float_format(np.array([value])) % value) if isinstance(value, float) else _text(value)
            lines.append(f"_{key}\t{text}")
    else:
        lines.append("loop_")
        lines += [f"_{col} #{i}" for i, col in enumerate(block.columns, 1)]
        if id(block) not in rows:
            rows[id(block)] = _loop_rows(block)
        lines += rows[id(block)]
    return lines + ["", ""]


def star_text(blocks: dict) -> str:
    """The text of a STAR file of ``blocks`` (write_star_table's)."""
    lines = ["", "# version 30001", ""]
    rows: dict[int, list[str]] = {}
    for name, block in blocks.items():
        lines += _block_lines(name, block, rows)
    return "\n".join(lines)


# what makes a STAR file's text in this context (background.StarTextInProcess in a run's writer thread; else
# star_text here)
TEXT_MAKER: ContextVar[Callable[[dict], str] | None] = ContextVar("star_text_maker", default=None)


def write_star_table(path, blocks: dict) -> None:
    """Write blocks atomically to ``path``, or to each path of a list (the text made once); a DataFrame is a loop_
    block, a dict of scalars a key/value block (RELION 3.1 layout)."""
    blocks = {name: _as_block(block) for name, block in blocks.items()}
    text = (TEXT_MAKER.get() or star_text)(blocks)
    for each in path if isinstance(path, (list, tuple)) else [path]:
        with atomic_write(each) as tmp:
            Path(tmp).write_text(text)


def write_star(path, blocks: dict[str, pd.DataFrame]) -> None:
    """Write {name: DataFrame} loop_ blocks atomically (to ``path``, or each of a list of paths)."""
    write_star_table(path, blocks)
