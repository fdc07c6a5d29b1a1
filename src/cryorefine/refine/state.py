"""The saved state of a finished iteration (run_itNNN_state.pt beside run_itNNN_optimiser.star), for --continue."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import CryoInputError


def state_path_for(optimiser_star) -> Path:
    """run_itNNN_optimiser.star -> run_itNNN_state.pt."""
    return Path(str(optimiser_star).replace("_optimiser.star", "_state.pt"))


def read_state(optimiser_star) -> dict:
    """The state saved with `optimiser_star`; CryoInputError if either file is missing or unreadable."""
    path = Path(optimiser_star)
    if not path.is_file():
        raise CryoInputError(
            "cannot continue: file not found; pass the run_itNNN_optimiser.star of a finished iteration", path=path
        )
    state = state_path_for(path)
    if not state.is_file():
        raise CryoInputError(
            f"cannot continue: no saved state {state.name} beside it; continue from an iteration this program finished",
            path=path,
        )
    try:
        saved = torch.load(state, weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CryoInputError(
            f"cannot continue: the saved state {state.name} is unreadable ({type(exc).__name__}); "
            "continue from an earlier iteration's optimiser.star",
            path=path,
        ) from exc
    if isinstance(saved.get("maps"), dict):
        saved["maps"] = [_iteration_map(path.parent / name, path) for name in saved["maps"]["mrc"]]
    return saved


def saved_maps(map_files: list[str]) -> dict:
    """The state's stand-in for maps written as this iteration's MRC files (float32, so read back exactly): the
    files' names, resolved beside the optimiser.star on --continue (a state of ~2 maps less per iteration)."""
    return {"mrc": [Path(f).name for f in map_files]}


def _iteration_map(mrc: Path, optimiser_star: Path) -> torch.Tensor:
    from ..io.mrc import read_map

    if not mrc.is_file():
        raise CryoInputError(
            f"cannot continue: the iteration's map {mrc.name} is missing beside it; continue from an "
            "iteration whose maps are all there",
            path=optimiser_star,
        )
    return torch.from_numpy(read_map(mrc)[0])
