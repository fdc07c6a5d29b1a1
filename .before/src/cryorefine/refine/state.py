"""A run's state between iterations, frozen (each iteration returns a new one), and its checkpoint: the saved state
of a finished iteration (run_itNNN_state.pt beside run_itNNN_optimiser.star), for --continue and for the other ranks."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CryoInputError
from ..io.atomic import atomic_write
from ..mstep.statistics import ModelStatistics
from .engine import ParticlePoses
from .schedule import Schedule


@dataclass(frozen=True)
class ClassState:
    """Classification's own state: the class priors, each class's resolution and the random class of the first
    iteration(s)."""

    prior: torch.Tensor  # (K,) float64
    resolution_shell: tuple[int, ...]
    initial_class: np.ndarray | None  # (n,) 0-based


@dataclass(frozen=True)
class RunState:
    """Everything the next iteration depends on. The maps are on the compute device, the rest on the host; arrays
    are not changed once a state holds them (an iteration works on copies)."""

    iteration: int
    perturbation: float  # of the HEALPix grid, this iteration's
    rng_state: Mapping[str, Any]  # numpy's bit generator state (the perturbations)
    maps: tuple[torch.Tensor, ...]  # per half set (auto-refine) or class
    stats: tuple[ModelStatistics, ...]  # per model: half set, or one for classification
    schedule: Schedule
    poses: ParticlePoses
    halves: np.ndarray  # (n,) rlnRandomSubset, 1 or 2
    history: tuple[dict, ...]  # one record per iteration (run.log's, the report's)
    fsc: torch.Tensor  # the last gold-standard FSC (auto-refine)
    direction_prior: Any  # RELION's pdf_direction: per half set (auto-refine), joint with the class (classification)
    classes: ClassState | None = None

    def with_schedule_copy(self) -> tuple["RunState", Schedule]:
        """(this state with its own copy of the schedule, that copy): the schedule's RELION rules update in place."""
        schedule = Schedule(**asdict(self.schedule))
        return replace(self, schedule=schedule), schedule


def to_checkpoint(state: RunState, config: dict) -> dict:
    """The state as the dictionary saved with each iteration and sent to the other ranks (the layout of every
    run_itNNN_state.pt so far: a run continues from older ones)."""
    out = {
        "iteration": state.iteration,
        "perturbation": state.perturbation,
        "maps": list(state.maps),
        "stats": list(state.stats),
        "schedule": asdict(state.schedule),
        "poses": state.poses.as_dict(),
        "halves": state.halves,
        "history": list(state.history),
        "fsc": state.fsc,
        "numpy_rng": state.rng_state,
        "direction_prior": state.direction_prior,
        "config": config,
    }
    if state.classes is not None:
        c = state.classes
        out.update(class_prior=c.prior, class_resolution=list(c.resolution_shell), initial_class=c.initial_class)
    return out


def from_checkpoint(s: dict, n_particles: int) -> RunState:
    poses = ParticlePoses(**{"residual_power": np.zeros(n_particles), **s["poses"]})  # older states lack it
    classes = None
    if "class_prior" in s:
        classes = ClassState(s["class_prior"], tuple(s["class_resolution"]), s["initial_class"])
    return RunState(
        s["iteration"], s["perturbation"], s["numpy_rng"], tuple(s["maps"]), tuple(s["stats"]),
        Schedule(**s["schedule"]), poses, s["halves"], tuple(s["history"]), s["fsc"], s["direction_prior"], classes,
    )  # fmt: skip


def save_checkpoint(path: str, state: RunState, config: dict, map_files: list[str] | None) -> None:
    """run_itNNN_state.pt, atomically; the maps as the names of this iteration's MRC files where they hold them."""
    saved = to_checkpoint(state, config)
    saved["maps"] = saved_maps(map_files) if map_files is not None else [m.cpu() for m in state.maps]
    with atomic_write(path) as tmp:
        torch.save(saved, tmp)


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
