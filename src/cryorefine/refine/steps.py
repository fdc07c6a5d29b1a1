"""Steps both modes take within an iteration, as functions of the run's context and state: the plan (sampling, pose
grid, windows, settings), an E-step pass over a set of particles, the --norm update, pose changes, the expected
accuracy, and the solvent flattening of new references."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..debug_hooks import pause_point
from ..estep import memory
from ..estep.images import Window, ctf_and_inverse_noise
from ..estep.poses import PoseGrid
from ..estep.settings import EStepSettings
from ..estep.sums import WeightedSums
from ..fourier.filters import low_pass_filter
from ..fourier.grids import relion_round
from ..geometry.healpix import HealpixSampling, make_sampling, next_random_perturbation
from ..mstep.norm import updated_norm_corrections
from ..mstep.statistics import ModelStatistics, estep_scale_shells
from ..projection.extract import window_grid_size
from ..projection.insert import BackProjector
from ..reconstruction.padded_fft import SAME_DEVICE, SlabDevices
from ..transfer import to_device, to_host
from .accuracy import N_TRIALS, expected_accuracy
from .context import RunContext
from .engine import (
    EStepPass,
    EStepRuntime,
    ParticlePoses,
    angular_change_deg,
    map_frame_radius,
    prepare_references,
    run_expectation,
    solvent_masked,
)
from .schedule import strict_window_shell
from .state import RunState


@dataclass(frozen=True)
class IterationPlan:
    """What one iteration's E-step needs: orientations and pose grid, Fourier windows (shells), settings; and what the
    plan found on the way (the expected accuracy it was based on, a note on the sampling)."""

    sampling: HealpixSampling
    grid: PoseGrid
    window: Window
    window_shell: int
    coarse_shell: int
    settings: EStepSettings
    map_radius: float  # the largest frequency (the map's pixels) the E-step reads or writes: the windowed grids' reach
    accuracy: tuple[float, float] = (999.0, 999.0)  # degrees, pixels
    note: str | None = None


def ini_shell(ctx: RunContext) -> int:
    """RELION's resolution before the first iteration: the shell of --ini_high."""
    return max(1, relion_round(ctx.box * ctx.angpix / ctx.cfg.ini_high))


def is_cc_iteration(ctx: RunContext, iteration: int) -> bool:
    return ctx.cfg.firstiter_cc and iteration == 1


def next_perturbation(ctx: RunContext, state: RunState) -> tuple[float, Mapping[str, Any]]:
    """RELION's random perturbation of the next iteration's grid (--perturb), and the generator's state after it."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng_state
    return next_random_perturbation(state.perturbation, ctx.cfg.perturb, rng), rng.bit_generator.state


def plan_iteration(
    ctx: RunContext, state: RunState, window_shell: int, settings: EStepSettings, accuracy, note
) -> IterationPlan:
    """The plan of ``state``'s iteration (its sampling already updated) at ``window_shell``: pose grid, windows and
    ``settings`` with the scored shell."""
    cfg, sch = ctx.cfg, state.schedule
    sampling = make_sampling(sch.healpix_order, cfg.sym, state.perturbation)
    grid = PoseGrid.build(sampling, sch.offset_range_px, sch.offset_step_px, device=ctx.device)
    # --strict_highres_exp (RELION's meaning): both passes score up to that shell (it replaces the adaptive coarse
    # size); reconstruction and σ² still use the whole window
    score_shell = strict_window_shell(window_shell, ctx.box, cfg.angpix, cfg.strict_highres_exp)
    coarse_shell = (
        score_shell
        if cfg.strict_highres_exp > 0
        else sch.coarse_shell(window_shell, ctx.box, cfg.angpix, cfg.particle_diameter)
    )
    window = Window.build(ctx.box, window_shell, ctx.device)
    return IterationPlan(
        sampling,
        grid,
        window,
        window_shell,
        coarse_shell,
        replace(settings, score_shell=score_shell),
        map_frame_radius(ctx.table, window, ctx.angpix),
        accuracy,
        note,
    )


def grid_size(ctx: RunContext, map_radius: float) -> int:
    """Edge of the stored padded grids (references, back-projectors) that hold the frequencies up to ``map_radius``
    (the map's pixels): the window's cube, or P."""
    return window_grid_size(map_radius, ctx.box, ctx.cfg.pad)


def check_estep_memory(ctx: RunContext, plan: IterationPlan, references: int, backprojectors: int) -> None:
    """Stop with one line (CryoInputError) before the E-step when the GPU cannot hold its ``references`` and
    ``backprojectors`` on the iteration's windowed grids (the window has outgrown the card)."""
    free = memory.available_bytes(ctx.device)
    if free is not None:
        memory.check_estep_volumes(
            ctx.box, ctx.cfg.pad, grid_size(ctx, plan.map_radius), references, backprojectors, free
        )


def parking_note(ctx: RunContext, plan: IterationPlan) -> str:
    """Auto-refine: why half set 1's back-projector waits in host memory while half set 2 is scored
    (memory.park_finished_half), for run.log; empty when it stays on the GPU (and on the CPU)."""
    free = memory.available_bytes(ctx.device)
    size = grid_size(ctx, plan.map_radius)
    if free is None or not memory.park_finished_half(free, size):
        return ""
    both = memory.halves_volume_bytes(size) / memory.GIB
    return (
        f"half set 1's back-projector in host memory while half set 2 was scored (a reference and two "
        f"back-projectors: {both:.2f} GiB, more than half of the {free / memory.GIB:.2f} GiB free)"
    )


def _nbytes(bp: BackProjector) -> int:
    """Bytes of a back-projector's accumulators (data and weight)."""
    return bp.data.nbytes + bp.weight.nbytes


@dataclass(frozen=True)
class MStepPlan:
    """Where an iteration's M-step runs (the memory plan's M-step rungs) and why, for run.log."""

    device: torch.device  # the accumulators and the float64 work on the window's cube
    slabs: SlabDevices  # the padded transforms and their P × P × m buffer
    note: str


def mstep_plan(
    ctx: RunContext, plan: IterationPlan, bps: list[BackProjector], max_shell: int, join_bytes_per_voxel: int
) -> MStepPlan:
    """The M-step's rung, from what it needs (estep/memory.mstep_bytes: reconstructions up to ``max_shell``) and what
    is free on the GPU beside what is allocated there (the accumulators ``bps`` there, the image cache; accumulators
    in host memory, parked there during the E-step, count as needed):
    1. all of it on the GPU;
    2. on the host (where RELION runs it), the accumulators moved there to free the GPU, the padded transforms on the
       GPU by slabs with their buffer there;
    3. the same with the buffer in pinned host memory.
    The CPU: the CPU."""
    free = memory.available_bytes(ctx.device)
    size = grid_size(ctx, plan.map_radius)
    grids = f"grids {size}/{ctx.box * ctx.cfg.pad} padded voxels"
    if free is None:
        return MStepPlan(ctx.device, SAME_DEVICE, grids)
    symmetric = ctx.cfg.sym.upper() != "C1"
    parked = sum(_nbytes(bp) for bp in bps if bp.data.device.type != "cuda")
    need = parked + memory.mstep_bytes(ctx.box, ctx.cfg.pad, size, max_shell, symmetric, join_bytes_per_voxel)
    gib = memory.GIB
    if need <= free:
        return MStepPlan(
            ctx.device, SAME_DEVICE, f"{grids}, M-step on the GPU ({need / gib:.2f} of {free / gib:.2f} GiB free)"
        )
    freed = free + sum(_nbytes(bp) for bp in bps if bp.data.device.type == "cuda")
    buffer = memory.transform_buffer_bytes(ctx.box, ctx.cfg.pad, size, max_shell)
    on_gpu = buffer <= freed
    return MStepPlan(
        torch.device("cpu"),
        SlabDevices(ctx.device, ctx.device if on_gpu else torch.device("cpu")),
        f"{grids}, M-step on the host (it needs {need / gib:.2f} GiB, {free / gib:.2f} GiB are free), its transforms "
        f"on the GPU with their {buffer / gib:.2f} GiB buffer on the {'GPU' if on_gpu else 'host (pinned)'}",
    )


def maximized(ctx: RunContext, where: MStepPlan, bps: list[BackProjector], maximize) -> tuple[MStepPlan, Any]:
    """``maximize(bps, slabs)`` (the M-step's reconstructions) where the plan put it; when a GPU M-step runs out of
    memory anyway (the byte model is an estimate), once more on the host rung, the transforms' buffer in pinned host
    memory: (the rung it ran on, its result)."""
    try:
        return where, maximize(bps, where.slabs)
    except torch.cuda.OutOfMemoryError:
        if where.device.type != "cuda":
            raise
    torch.cuda.empty_cache()
    host = MStepPlan(
        torch.device("cpu"),
        SlabDevices(ctx.device, torch.device("cpu")),
        f"{where.note}; it ran out of GPU memory there: on the host, its transforms on the GPU with their buffer on "
        "the host (pinned)",
    )
    return host, maximize(on_device(bps, host.device), host.slabs)


def on_device(bps: list[BackProjector], device: torch.device) -> list[BackProjector]:
    """The accumulators moved to ``device`` in place (a GPU's memory is freed for the M-step); returns them."""
    for bp in bps:
        bp.data, bp.weight = bp.data.to(device), bp.weight.to(device)
    return bps


def estep_settings(ctx: RunContext, state: RunState, direction_log_prior=None) -> EStepSettings:
    cfg, sch = ctx.cfg, state.schedule
    return EStepSettings(
        adaptive_fraction=cfg.adaptive_fraction,
        maxsig=cfg.maxsig,
        firstiter_cc=is_cc_iteration(ctx, state.iteration),
        local_sigma_deg=sch.local_sigmas_deg,
        sigma2_offset_angst2=state.stats[0].sigma2_offset_angst2,
        angpix=cfg.angpix,
        direction_log_prior=direction_log_prior,
        precision=cfg.precision,
    )


def weighted_sums(
    ctx: RunContext, n_classes: int, n_directions: int, stats: ModelStatistics, map_radius: float
) -> WeightedSums:
    """An E-step's zeroed accumulators for ``n_classes`` maps, the back-projectors windowed to ``map_radius`` (the
    map's pixels): σ² per optics group (up to the largest box's Nyquist), the scales per micrograph group over the
    shells ``stats``' classes take (with --scale)."""
    cfg = ctx.cfg
    return WeightedSums.zeros(
        n_classes, ctx.box, cfg.pad, ctx.n_groups, n_directions, device=ctx.device, n_shells=ctx.n_shells,
        n_scale_groups=len(ctx.groups.names), scale_shells=estep_scale_shells(stats, cfg.scale, ctx.device),
        grid_size=grid_size(ctx, map_radius),
    )  # fmt: skip


def references(ctx: RunContext, maps, map_radius: float, on_host: bool = False):
    """The padded transforms the E-step projects, windowed to ``map_radius`` (the map's pixels); ``on_host``: kept in
    host memory, each copied to the device when its class is projected (engine.HostReferences)."""
    return prepare_references(list(maps), ctx.cfg.pad, ctx.device, grid_size(ctx, map_radius), on_host)


def memory_note(*notes: str) -> str:
    """run.log's "memory" field of an iteration: where the memory plan put the M-step and volumes out of the GPU."""
    return "; ".join(filter(None, notes))


def references_on_host_note(ctx: RunContext, plan: IterationPlan, classes: int) -> str:
    """Classification: why the K references wait in host memory this iteration (memory.references_on_host), for
    run.log; empty when they stay on the GPU (and on the CPU)."""
    free = memory.available_bytes(ctx.device)
    size = grid_size(ctx, plan.map_radius)
    if free is None or not memory.references_on_host(free, size, classes):
        return ""
    need = memory.estep_volumes_total(size, classes, classes) / memory.GIB
    return (
        f"the {classes} references in host memory, each copied to the GPU while its class was scored ({classes} "
        f"references and back-projectors: {need:.2f} GiB, {free / memory.GIB:.2f} GiB free)"
    )


def estep_pass(
    ctx: RunContext,
    state: RunState,
    poses: ParticlePoses,
    half: int,
    rows: np.ndarray,
    refs,
    plan: IterationPlan,
    sums: WeightedSums,
    progress,
    **kw,
) -> np.ndarray:
    """This rank's batches of one E-step pass over ``rows`` (``half``: 1, 2, or 0 for all), written into ``poses`` and
    ``sums``; returns the rows it did."""
    key = f"it{state.iteration}/half{half}"
    stats = state.stats[max(half - 1, 0)]
    settings = replace(plan.settings, sigma2_offset_angst2=stats.sigma2_offset_angst2)
    job = EStepPass(
        refs,
        plan.grid,
        plan.window,
        plan.coarse_shell,
        stats.sigma2.to(ctx.device),
        stats.scale,
        settings,
        local=state.schedule.local_search,
        **kw,
    )
    runtime = EStepRuntime(
        ctx.cfg,
        (ctx.cfg.random_seed, state.iteration, half),
        ctx.timer,
        progress,
        ctx.batch_size,
        tasks=lambda n: ctx.pool.take(key, n),
        cache=ctx.images,
    )
    done = run_expectation(ctx.table, rows, poses, job, sums, runtime)
    if half <= 1:  # the kill tests' E-step point: after half set 1 of auto-refine, after classification's pass
        pause_point("estep", state.iteration, ctx.writer.wait)
    return done


def average_norm_correction(poses: ParticlePoses, rows: np.ndarray, iteration: int) -> float:
    """RELION's avg_norm_correction of the model of ``rows``: 1 in a run's first iteration (whatever the input's
    rlnNormCorrection), then the mean of the corrections the last E-step estimated for them."""
    return 1.0 if iteration == 1 else float(np.mean(poses.norm_correction[rows]))


def update_norm_corrections(ctx: RunContext, poses: ParticlePoses, model_of_particle: np.ndarray, iteration: int):
    """--norm, in the M-step: each particle's rlnNormCorrection from its residual power in the E-step just done,
    relative to its model's average that the E-step used (mstep/norm.py); written into this iteration's ``poses``."""
    if not ctx.cfg.norm:
        return
    for m in np.unique(model_of_particle):
        rows = np.flatnonzero(model_of_particle == m)
        avg = average_norm_correction(poses, rows, iteration)
        poses.norm_correction[rows] = updated_norm_corrections(
            poses.norm_correction[rows], avg, poses.residual_power[rows], ctx.table.boxes[rows]
        )


def pose_changes(ctx: RunContext, previous: ParticlePoses, poses: ParticlePoses) -> tuple[float, float]:
    """Mean angular change (°, RELION's symmetry-aware measure) and rms offset change (px) since ``previous``."""
    d_ang = angular_change_deg(
        previous.rot_deg, previous.tilt_deg, previous.psi_deg, poses.rot_deg, poses.tilt_deg, poses.psi_deg, ctx.cfg.sym
    )
    d_off = (
        np.hypot(previous.origin_x_angst - poses.origin_x_angst, previous.origin_y_angst - poses.origin_y_angst)
        / ctx.angpix
    )
    return float(np.mean(d_ang)), float(np.sqrt(np.mean(d_off**2)))


def accuracy_of(
    ctx: RunContext, state: RunState, window_shell: int, volume: torch.Tensor, rows: np.ndarray
) -> tuple[float, float]:
    """RELION's expected accuracy (accuracy.py; degrees, pixels) of up to 100 of ``rows``, drawn anew each
    iteration (the same for every map), at their poses in ``state`` against ``volume``, over ``window_shell`` (capped
    by --strict_highres_exp, as the E-step's scores), with the first model's σ²."""
    cfg = ctx.cfg
    rng = np.random.default_rng([cfg.random_seed, state.iteration, 17])
    on_map_grid = rows[(ctx.table.boxes[rows] == ctx.box) & (ctx.table.angpix[rows] == ctx.angpix)]  # its window's
    rows = on_map_grid if len(on_map_grid) else rows
    pick = np.sort(rng.choice(rows, min(N_TRIALS, len(rows)), replace=False))
    score_shell = strict_window_shell(window_shell, ctx.box, cfg.angpix, cfg.strict_highres_exp)
    window = Window.build(ctx.box, score_shell, ctx.device)
    ref = references(ctx, [volume], map_frame_radius(ctx.table, window, ctx.angpix))[0]
    group = to_device(ctx.table.optics_group[pick], ctx.device)
    ctf, inv_sigma2 = ctf_and_inverse_noise(
        ctx.table, pick, group, window, state.stats[0].sigma2.to(ctx.device), cfg.ctf, ctx.device, cfg.ctf_options
    )
    p = state.poses
    eulers = np.stack([p.rot_deg[pick], p.tilt_deg[pick], p.psi_deg[pick]], -1)
    return expected_accuracy(ref, eulers, ctf, inv_sigma2, window, rng)


def new_references(ctx: RunContext, maps: list[torch.Tensor], iteration: int) -> tuple[torch.Tensor, ...]:
    """The M-step's maps as the next references: after the --firstiter_cc iteration low-passed to --ini_high again,
    then RELION's solventFlatten (solvent_masked): the next E-step, the expected accuracy and the written maps see
    them masked."""
    cfg = ctx.cfg
    if is_cc_iteration(ctx, iteration):
        maps = [low_pass_filter(m.double(), cfg.ini_high, cfg.angpix).to(m.dtype) for m in maps]
    return tuple(
        solvent_masked(m, cfg.particle_diameter, cfg.angpix, cfg.flatten_solvent, ctx.solvent_mask) for m in maps
    )


def base_record(ctx: RunContext, state: RunState, plan: IterationPlan, poses: ParticlePoses, changes, ranks) -> dict:
    """The fields of an iteration's record that both modes have (run.log, the report, trajectory tools)."""
    sch = state.schedule
    return {
        "iteration": state.iteration,
        "healpix_order": sch.healpix_order,
        "local": sch.local_search,
        "window_shell": plan.window_shell,
        "coarse_shell": plan.coarse_shell,
        "change_orientation_deg": changes[0],
        "change_offset_px": changes[1],
        "mean_significant": float(np.mean(poses.n_significant)),
        "mean_max_prob": float(np.mean(poses.max_prob)),
        "posterior_spread_deg": float(np.median(poses.angular_spread_deg)),
        **ranks,
    }


def central_slices(volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The central (xy, xz, yz) planes of a (d0, d1, d2) map (a tensor on any device, or an array) as float32 host
    arrays: what report.html draws of it (the whole map, pickled to the report's worker process, took ~0.5 s at 256³).
    Copied as to_host does: the files' thread calls this, off the run's stream."""
    v = torch.as_tensor(volume)
    d0, d1, d2 = v.shape
    xy, xz, yz = to_host([v[d0 // 2], v[:, d1 // 2, :], v[:, :, d2 // 2]])
    return tuple(p.astype(np.float32, copy=False) for p in (xy, xz, yz))  # type: ignore[return-value]


def submit_report(ctx: RunContext, state: RunState, fsc: np.ndarray, volume, force: bool) -> None:
    """report.html of ``state`` and its map ``volume`` (d, d, d) to the run's refresher (drawn in its worker process
    if due or ``force``d; skipped where matplotlib is missing). Of the poses the report takes the angles only, and of
    the map its central slices, so that the worker imports no torch and is sent little."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    root, p = Path(ctx.root), state.poses
    angles = SimpleNamespace(rot_deg=p.rot_deg.copy(), tilt_deg=p.tilt_deg.copy())
    slices = central_slices(volume)
    ctx.report.submit((root.parent, str(root), list(state.history), fsc, ctx.box, ctx.angpix, angles, slices), force)
