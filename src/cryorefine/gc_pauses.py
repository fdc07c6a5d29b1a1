"""Python's cyclic garbage collector kept from pausing the program's start-up."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def imports_without_collections() -> Iterator[None]:
    """No cyclic collections while the block runs (the program's imports: torch, pandas, Triton, the subcommands),
    then every object tracked so far frozen (gc.freeze: later collections leave them alone). Importing creates
    hundreds of thousands of long-lived objects, and each full collection it set off traversed all of them (three
    while the parser's modules were imported, 0.21 s on a 2-core CPU), the younger generations' again and again: the
    program reached its parsed command line in a median 2.90 s without this, 2.05 s with it
    (bench/results/2026-12-06e-cpu2-startup-gc.md). Reference counting still frees what is let go; cycles among the
    frozen objects (few: module-level) are never collected."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
