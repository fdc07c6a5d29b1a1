"""The one loop of a run: each iteration the mode plans and runs its E-step, the loop combines the ranks' sums and
poses, rank 0's mode does the M-step and the schedule, the new state goes to every rank, and rank 0's files are
written in the background while the next iteration computes. The loop also owns the time budget (--max_seconds),
the log and the report. Auto-refine and classification are two modes (auto_refine.py, classify3d.py)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import DistributedError
from ..estep.sums import WeightedSums
from ..io.outputs import it_prefix
from ..parallel.collectives import all_reduce_sum_, broadcast_from_main, broadcast_tensors_, merge_rows_, per_rank
from ..thread_switches import prompt_thread_switches
from .context import RunContext
from .engine import ParticlePoses
from .relion_files import write_checkpoint
from .state import RunState, from_checkpoint, to_checkpoint
from .steps import IterationPlan
from .timing import profiled


@dataclass(frozen=True)
class EStepOutput:
    """A mode's E-step of one iteration on this rank: the weighted sums (per half set, or one for the classes), the
    rows it did, what the M-step needs from the references it used (classification's τ²), and where the memory plan
    put volumes out of the GPU (for run.log; empty when it did not)."""

    sums: list[WeightedSums]
    done: np.ndarray
    class_tau2: list[torch.Tensor] | None = None
    note: str = ""


class Mode(Protocol):
    """What differs between auto-refine and classification."""

    command: str

    def describe(self, ctx: RunContext) -> str: ...

    def initial_state(self, ctx: RunContext, reference: np.ndarray) -> RunState: ...

    def before_iteration(self, ctx: RunContext, state: RunState) -> RunState | None:
        """The state to run the next iteration from, or None when the run is done."""
        ...

    def is_final(self, state: RunState) -> bool: ...

    def plan(self, ctx: RunContext, state: RunState) -> tuple[IterationPlan, RunState]:
        """The next iteration's plan and the state it runs in (iteration number, perturbation, sampling advanced)."""
        ...

    def expectation(
        self, ctx: RunContext, state: RunState, plan: IterationPlan, poses: ParticlePoses
    ) -> EStepOutput: ...

    def conclude(
        self, ctx: RunContext, state: RunState, plan: IterationPlan, estep: EStepOutput, poses: ParticlePoses
    ) -> tuple[RunState, dict, dict]:
        """Rank 0: the M-step and the schedule's next step: (new state, the iteration's record, the M-step's
        results for the files)."""
        ...

    def write_files(self, ctx: RunContext, state: RunState, info: dict) -> list[str] | None:
        """Rank 0's RELION files of the iteration (background thread); returns the MRC files that hold the state's
        maps (the checkpoint refers to them), or None."""
        ...

    def summary(self, ctx: RunContext, state: RunState) -> dict: ...


def share_state(ctx: RunContext, state: RunState | None) -> RunState:
    """Rank 0's state on every rank, so that all plan the same next iteration (the maps travel as tensors)."""
    if ctx.dist.world_size <= 1:
        assert state is not None
        return state
    saved = to_checkpoint(state, {}) if ctx.dist.is_main and state is not None else None
    maps = []
    if saved is not None:
        maps = saved.pop("maps")
        saved["map_shapes"] = [(tuple(m.shape), m.dtype) for m in maps]
    saved = broadcast_from_main(saved, ctx.dist)
    if not ctx.dist.is_main:
        maps = [torch.empty(shape, dtype=dtype, device=ctx.device) for shape, dtype in saved["map_shapes"]]
    broadcast_tensors_(maps, ctx.dist)
    if ctx.dist.is_main:
        assert state is not None
        return state
    return from_checkpoint(dict(saved, maps=maps), len(ctx.table))


def combine_ranks(ctx: RunContext, estep: EStepOutput, poses: ParticlePoses, clock: float) -> dict:
    """Accumulators summed and per-particle results gathered over ranks; returns each rank's batches and E-step
    seconds (from its iteration's start to its last batch's end: the slowest sets when the all-reduce ends)."""
    if ctx.dist.world_size > 1 and ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    estep_s = time.perf_counter() - clock
    with ctx.timer("combine ranks"):
        for s in estep.sums:
            all_reduce_sum_(s.tensors(), ctx.dist)
        merge_rows_(list(poses.as_dict().values()), estep.done, ctx.dist)
        ranks = per_rank([ctx.pool.taken_since_last_call(), estep_s], ctx.dist)
    return {"batches_per_rank": [int(r[0]) for r in ranks], "estep_s_per_rank": [round(r[1], 3) for r in ranks]}


def run_estep(
    mode: Mode, ctx: RunContext, state: RunState, plan: IterationPlan, clock: float
) -> tuple[EStepOutput, ParticlePoses, dict]:
    """One iteration's E-step on every rank, combined: (sums and rows, the new poses, per-rank figures)."""
    poses = state.poses.copy()
    estep = mode.expectation(ctx, state, plan, poses)
    return estep, poses, combine_ranks(ctx, estep, poses, clock)


def iterate(mode: Mode, ctx: RunContext, state: RunState, clock: float) -> tuple[RunState, dict | None]:
    """One iteration on every rank: E-step, rank 0's M-step, rank 0's state to every rank. Returns the new state and,
    on rank 0, the M-step's results for the files (None elsewhere). ``clock``: when the iteration began."""
    with ctx.timer.host("plan"):
        plan, state = mode.plan(ctx, state)
    estep, poses, ranks = run_estep(mode, ctx, state, plan, clock)
    new: RunState | None = None
    info = None
    if ctx.dist.is_main:
        with ctx.timer("M-step"):
            new, record, info = mode.conclude(ctx, state, plan, estep, poses)
        startup = ctx.timer.take_startup()
        record = {
            **record,
            **ranks,
            "seconds": time.perf_counter() - clock,
            "stages": ctx.timer.reset(),
            "counters": ctx.timer.reset_counters(),
            "host_s": ctx.timer.reset_host(),
            "allocator": ctx.timer.reset_allocator(),
            **({} if startup is None else {"startup_s": startup}),
        }
        new = replace(new, history=new.history + (record,))
    else:  # rank 0's record holds rank 0's stage times and counters
        ctx.timer.reset()
        ctx.timer.reset_counters()
        ctx.timer.reset_host()
        ctx.timer.reset_allocator()
    return share_state(ctx, new), info


def _write(mode: Mode, ctx: RunContext, state: RunState, info: dict) -> None:
    write_checkpoint(ctx, state, mode.write_files(ctx, state, info))


def _out_of_time(ctx: RunContext, state: RunState, t0: float, last_seconds: float | None) -> bool:
    """--max_seconds: would the next iteration end past the budget? Estimated by the last iteration's wall time
    (this call's, else the saved history's); with no estimate, one iteration runs. Rank 0 decides (its clock; its
    iterations include the M-step and the files) and tells the others, so that every rank stops after the same
    iteration."""
    if ctx.cfg.max_seconds <= 0:  # the same on every rank (one command line)
        return False
    late = None
    if ctx.dist.is_main:
        if last_seconds is None and state.history:
            last_seconds = state.history[-1]["seconds"]
        late = last_seconds is not None and time.perf_counter() - t0 + last_seconds > ctx.cfg.max_seconds
    return bool(broadcast_from_main(late, ctx.dist, "agreeing on --max_seconds with rank 0"))


def _stopped(ctx: RunContext, state: RunState, t0: float) -> dict:
    resume = f"{it_prefix(ctx.root, state.iteration)}_optimiser.star"
    ctx.log.line(
        f"stopping after iteration {state.iteration}: the next would end past --max_seconds {ctx.cfg.max_seconds:g}; "
        f"resume with --continue {resume}"
    )
    return {
        "stopped": True,
        "iterations": state.iteration,
        "seconds": time.perf_counter() - t0,
        "continue_from": resume,
    }


def _resume_hint(ctx: RunContext) -> str:
    root = Path(ctx.root)
    done = sorted(root.parent.glob(f"{root.name}_it*_optimiser.star"))
    return f"resume with --continue {done[-1]}" if done else "no iteration finished; start the run again"


def _iterate_until_done(mode: Mode, ctx: RunContext, state: RunState, t0: float) -> dict:
    clock, last = time.perf_counter(), None
    while True:
        ready = mode.before_iteration(ctx, state)
        if ready is None:  # done before out of time: a run whose last iteration fitted the budget has finished
            return mode.summary(ctx, state)
        if _out_of_time(ctx, state, t0, last):
            return _stopped(ctx, state, t0)
        t_it = time.perf_counter()
        with profiled(ready.iteration + 1, mode.is_final(ready)):
            state, info = iterate(mode, ctx, ready, clock)
        clock = time.perf_counter()  # an iteration's seconds run from here: rank 0's writing overlaps the next E-step
        if ctx.dist.is_main:
            # after sharing: the other ranks start the next E-step meanwhile, and the pool gives rank 0 fewer batches
            ctx.log.iteration(state.history[-1])
            with ctx.timer.host("waiting for files"):  # the last iteration's: counted in the next iteration's
                ctx.writer.submit(_write, mode, ctx, state, info)
        last = time.perf_counter() - t_it


def run(mode: Mode, ctx: RunContext, state: RunState) -> dict:
    """Iterate ``mode`` from ``state`` until it is done (or --max_seconds); every file of the last iteration is on disk
    when this returns. Returns the run's summary (printed as JSON by the CLI)."""
    d, cfg = ctx.dist, ctx.cfg
    ranks = f", {d.world_size} ranks ({d.backend})" if d.grouped else ""
    ctx.log.line(
        f"cryorefine {mode.command}: {len(ctx.table)} particles, box {ctx.box}, {cfg.angpix:.3f} Å/px, device "
        f"{ctx.device}, {mode.describe(ctx)}{ranks}, batches of {ctx.batch_size}, coarse products in "
        f"{cfg.precision}"
    )
    if d.is_main:  # the one rank that draws reports and writes files: their worker processes start now
        ctx.report.prepare()
        ctx.writer.prepare()
    t0 = time.perf_counter()
    try:
        try:
            with prompt_thread_switches():  # until the file thread's last job is done (writer.close())
                try:
                    summary = _iterate_until_done(mode, ctx, share_state(ctx, state), t0)
                finally:
                    t_files = time.perf_counter()
                    ctx.writer.close()
        finally:
            if ctx.scratch is not None:  # --scratch_dir's copies
                ctx.table.close()
                shutil.rmtree(ctx.scratch, ignore_errors=True)
    except DistributedError as exc:  # also when torchrun's SIGTERM lands while the files are being finished
        # the hint names the last iteration whose files are complete; a second error (torchrun's SIGTERM landing
        # while these wait) must not replace the first without its hint
        for close in (ctx.writer.close, ctx.report.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - the distributed error is the one to report
                pass
        raise DistributedError(f"{exc}; {_resume_hint(ctx)}") from exc
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            ctx.report.close()  # the worker prepare() started: not left idle until the interpreter exits
        raise
    t_report = time.perf_counter()
    ctx.report.flush()  # a refresh the interval held back (a run stopped by --max_seconds)
    t_end = time.perf_counter()
    # the run's tail after its last iteration: the last files, then report.html (drawn meanwhile)
    summary["closing_s"] = {"files": round(t_report - t_files, 3), "report": round(t_end - t_report, 3)}
    summary["seconds"] = t_end - t0
    if not summary.get("stopped"):  # a run stopped by --max_seconds has logged how to resume
        ctx.log.line("finished: " + json.dumps(summary))
    return summary
