"""STAR files as {block name: pandas.DataFrame}; column names without the leading underscore."""

from __future__ import annotations

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
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on malformed input
        raise CryoInputError(
            f"malformed STAR file ({type(exc).__name__}: {exc}); check that it is a RELION/cryoSPARC STAR file",
            path=path,
        ) from exc
    if not blocks:
        raise CryoInputError("STAR file holds no data_ blocks", path=path)
    return {
        name: (block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])) for name, block in blocks.items()
    }


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


def _block_lines(name: str, block) -> list[str]:
    lines = [f"data_{name}", ""]
    if isinstance(block, dict):
        for key, value in block.items():
            if isinstance(value, bool):
                value = int(value)
            text = (_float_format(np.array([value])) % value) if isinstance(value, float) else _texts([value])[0]
            lines.append(f"_{key}\t{text}")
    else:
        lines.append("loop_")
        lines += [f"_{col} #{i}" for i, col in enumerate(block.columns, 1)]
        lines += _loop_rows(block)
    return lines + ["", ""]


def write_star_table(path, blocks: dict) -> None:
    """Write blocks atomically; a DataFrame is a loop_ block, a dict of scalars a key/value block (RELION 3.1
    layout)."""
    lines = ["", "# version 30001", ""]
    for name, block in blocks.items():
        lines += _block_lines(name, _as_block(block))
    with atomic_write(path) as tmp:
        Path(tmp).write_text("\n".join(lines))


def write_star(path, blocks: dict[str, pd.DataFrame]) -> None:
    """Write {name: DataFrame} loop_ blocks atomically."""
    write_star_table(path, blocks)
