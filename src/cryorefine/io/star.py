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
        raise CryoInputError(f"malformed STAR file ({type(exc).__name__}: {exc}); check that it "
                             "is a RELION/cryoSPARC STAR file", path=path) from exc
    if not blocks:
        raise CryoInputError("STAR file holds no data_ blocks", path=path)
    return {name: (block if isinstance(block, pd.DataFrame) else pd.DataFrame([block]))
            for name, block in blocks.items()}


def _as_block(block):
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):  # key/value ("general") block: keep plain python scalars
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in block.items()}
    raise TypeError(f"STAR block must be a DataFrame or dict, got {type(block).__name__}")


def write_star_table(path, blocks: dict) -> None:
    """Write blocks atomically; a DataFrame is a loop_ block, a dict of scalars a key/value block."""
    blocks = {name: _as_block(b) for name, b in blocks.items()}
    with atomic_write(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True)


def write_star(path, blocks: dict[str, pd.DataFrame]) -> None:
    """Write {name: DataFrame} loop_ blocks atomically."""
    write_star_table(path, blocks)
