"""3D auto-refine: gold-standard MAP-EM with RELION's schedule (random halves, FSC-driven τ², finer sampling, final
join), as a mode of the run's loop (loop.py): the state it starts from, its plan, E-step, M-step and files."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from ..fourier.filters import low_pass_filter
from ..io.background import side_by_side
from ..io.mrc import read_map, write_maps
from ..io.outputs import it_prefix, write_angdist_bild, write_model_star
from ..io.particles import write_particles
from ..io.table import ParticleTable
from ..estep.memory import JOINED_BYTES_PER_VOXEL
from ..mstep.maximize import join_at_low_resolution_, maximize_half_sets
from ..mstep.noise import SpectrumReads, initial_sigma2, on_map_shells
from ..mstep.priors import direction_log_prior, direction_prior
from ..mstep.statistics import (
    GroupScales,
    ModelStatistics,
    initial_data_vs_prior,
    map_shell_power,
    scale_spread,
    updated_statistics,
    upgraded,
)
from ..parallel.collectives import all_reduce_sum_, broadcast_from_main
from ..parallel.context import Dist
from ..debug_hooks import pause_point
from ..reconstruction.fsc import fsc_to_ssnr, shell_to_angstrom
from ..reconstruction.reconstruct import GRIDDING_ITERATIONS, overall_completeness
from ..reconstruction.symmetrise import symmetrise_backprojector
from ..validate import check_random_subsets
from . import steps
from .config import RefineConfig
from .context import RunContext, open_run, output_lock
from .engine import ParticlePoses
from .loop import EStepOutput, run
from .progress import Progress
from .relion_files import (
    class_table,
    data_columns,
    direction_tables,
    groups_table,
    model_general,
    noise_tables,
    write_sampling,
)
from .schedule import Schedule
from .state import RunState, from_checkpoint, read_state

# the last iteration's files at once: seven maps (three written, four copies), three model.star, two data.star (one
# text), the sampling and the angular distribution, which the run's end waits for
FINAL_FILE_THREADS = 4
# one half's reference at a time, both halves' back-projectors (half set 1's may wait in host memory while half set
# 2 is scored: memory.park_finished_half); the final iteration's E-step holds the whole grids
ESTEP_VOLUMES = {"references": 1, "backprojectors": 2, "resident_backprojectors": 1, "whole": True}


def halves_of(table: ParticleTable, seed: int) -> np.ndarray:
    """rlnRandomSubset (1/2) where the STAR has it, else (none, or all 0) a seeded random split into equal halves; a
    column that mixes 1/2 with other values stops the run, as RELION's."""
    check_random_subsets(table)
    subset = np.asarray(table.random_subset)
    if (subset == 1).any() and (subset == 2).any():
        return subset.astype(np.int64)
    rng = np.random.default_rng(seed)
    out = np.ones(len(table), dtype=np.int64)
    out[rng.permutation(len(table))[: len(table) // 2]] = 2
    return out


def initial_statistics(
    ctx: RunContext, model_of_particle: np.ndarray, n_models: int, start: torch.Tensor, n_classes: int = 1
) -> tuple[ModelStatistics, ...]:
    """Each model's initial σ² from its particles' images (RELION masks them for this only with --zero_mask: without
    it, the E-step fills the area outside the mask with noise of this σ², so a masked spectrum would be the mask's
    area fraction too small), the initial offset prior, scales 1 for its micrograph groups and RELION's initial
    data-to-prior ratio of its ``n_classes`` from the low-passed ``start``."""
    cfg = ctx.cfg
    radius = cfg.particle_diameter / 2 if cfg.zero_mask else None
    # the images go through the GPU image cache, so the first iteration finds them there instead of reading the stacks
    # again; several ranks read a share each and sum their spectra
    d = ctx.dist
    reads = SpectrumReads(
        partial(ctx.images.load, ctx.table),
        ctx.images.images,
        d.rank,
        d.world_size,
        partial(all_reduce_sum_, dist=d, what="summing the initial noise spectra") if d.grouped else None,
    )
    sigma2 = initial_sigma2(
        ctx.table, ctx.n_groups, model_of_particle, device=ctx.device, mask_radius_angst=radius, reads=reads
    )
    assert len(sigma2) == n_models
    groups, optics = ctx.groups, ctx.table.optics_group
    power = on_device_or_host(map_shell_power, start, ctx.device)  # one map: the same for every model
    return tuple(
        ModelStatistics.initial(
            s,
            cfg.sigma_offset,
            GroupScales.ones(groups.of_particle, model_of_particle == h, len(groups.names)),
            initial_data_vs_prior(
                power,
                n_classes,
                torch.stack(
                    [on_map_shells(row, o.box, o.angpix, ctx.box, ctx.angpix) for row, o in zip(s, ctx.table.optics)]
                ),
                np.bincount(optics[model_of_particle == h], minlength=ctx.n_groups),
                cfg.tau2_fudge,
            ),
        )
        for h, s in enumerate(sigma2)
    )


def initial_schedule(ctx: RunContext) -> Schedule:
    cfg = ctx.cfg
    sch = Schedule(
        cfg.healpix_order,
        cfg.offset_range,
        cfg.offset_step,
        current_resolution_shell=steps.ini_shell(ctx),
        incr_size=cfg.incr_size,
    )
    # RELION: --sigma_ang wins over --sigma_rot/--sigma_tilt/--sigma_psi; either starts local searches
    if cfg.sigma_ang > 0:
        sch.local_search, sch.sigma_ang_deg = True, cfg.sigma_ang
    elif max(cfg.sigma_rot, cfg.sigma_tilt, cfg.sigma_psi) > 0:
        sch.local_search = True
        sch.sigma_rot_tilt_psi_deg = (max(cfg.sigma_rot, 0.0), max(cfg.sigma_tilt, 0.0), max(cfg.sigma_psi, 0.0))
    return sch


def on_device_or_host(fn, x: torch.Tensor, device) -> torch.Tensor:
    """``fn(x)`` computed on ``device`` (a GPU's double-precision 3D transforms take milliseconds where the host's take
    seconds at box 256+), returned on the host; on the host where the GPU has no room for it (a start under a tight
    --gpu_memory)."""
    try:
        return fn(x.to(device)).cpu()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return fn(x.cpu()).cpu()


def start_map(ctx: RunContext, reference: np.ndarray) -> torch.Tensor:
    """The reference low-passed to --ini_high (RELION's initialLowPassFilterReferences), float32 on the host."""
    lowpass = partial(low_pass_filter, resolution_angst=ctx.cfg.ini_high, angpix=ctx.angpix)
    return on_device_or_host(lowpass, torch.from_numpy(reference).double(), ctx.device).float()


class AutoRefineMode:
    """One auto-refine run: iterations until convergence, then the final joined iteration."""

    command = "refine"

    def describe(self, ctx: RunContext) -> str:
        return f"sym {ctx.cfg.sym}"

    def initial_state(self, ctx: RunContext, reference: np.ndarray) -> RunState:
        cfg = ctx.cfg
        halves = halves_of(ctx.table, cfg.random_seed)
        start = start_map(ctx, reference)
        return RunState(
            iteration=0,
            perturbation=0.0,
            rng_state=np.random.default_rng(cfg.random_seed).bit_generator.state,
            maps=(start.clone(), start.clone()),
            stats=initial_statistics(ctx, halves - 1, 2, start),
            schedule=initial_schedule(ctx),
            poses=ParticlePoses.from_table(ctx.table),
            halves=halves,
            history=(),
            fsc=torch.zeros(ctx.box // 2 + 1, dtype=torch.float64),
            direction_prior=[None, None],  # per half set: RELION's pdf_direction (mstep/priors.py), uniform at first
        )

    def before_iteration(self, ctx: RunContext, state: RunState) -> RunState | None:
        if state.schedule.final_iteration:
            return None
        state, sch = state.with_schedule_copy()
        sch.check_convergence()  # RELION checks at the start of each iteration
        if state.iteration >= ctx.cfg.max_iter - 1:
            sch.final_iteration = True
        return state

    def is_final(self, state: RunState) -> bool:
        return state.schedule.final_iteration

    # ------------------------------------------------------------------ plan
    def plan(self, ctx: RunContext, state: RunState) -> tuple[steps.IterationPlan, RunState]:
        """RELION, before each E-step: the window from the last iteration's ⟨pmax⟩; the expected accuracy of the current
        poses and map (half 1) over it; from the second iteration on updateAngularSampling (finer, or fine enough)."""
        ave_pmax = state.history[-1]["mean_max_prob"] if state.history else 0.0
        window_shell = state.schedule.window_shell(ctx.box, ave_pmax)
        perturbation, rng_state = steps.next_perturbation(ctx, state)
        state, sch = replace(
            state, iteration=state.iteration + 1, perturbation=perturbation, rng_state=rng_state
        ).with_schedule_copy()
        accuracy, note = (999.0, 999.0), None
        if not steps.is_cc_iteration(ctx, state.iteration):  # RELION: no accuracy for the cross-correlation iteration
            # rank 0's estimate on every rank: the sampling it decides must be the same everywhere
            acc = (
                steps.accuracy_of(ctx, state, window_shell, state.maps[0], np.flatnonzero(state.halves == 1))
                if ctx.dist.is_main
                else None
            )
            accuracy = broadcast_from_main(acc, ctx.dist, "sharing the expected accuracy with rank 0")
            if state.iteration >= 2:
                note = sch.update_angular_sampling(
                    accuracy[0], ctx.cfg.auto_local_healpix_order, accuracy[1], ctx.angpix
                )
        settings = steps.estep_settings(ctx, state)
        return steps.plan_iteration(ctx, state, window_shell, settings, accuracy, note), state

    # ------------------------------------------------------------------ E-step
    def expectation(
        self, ctx: RunContext, state: RunState, plan: steps.IterationPlan, poses: ParticlePoses
    ) -> EStepOutput:
        """E-step of both half sets (this rank's share), each against its own reference and direction prior."""
        cfg = ctx.cfg
        steps.check_estep_memory(ctx, plan, ESTEP_VOLUMES["references"], ESTEP_VOLUMES["resident_backprojectors"])
        park = steps.parking_note(ctx, plan)
        sums, done = [], []
        refs: list | None = None
        with Progress(len(ctx.table), f"iteration {state.iteration:3d}", ctx.dist.is_main) as bar:
            for half in (1, 2):
                with ctx.timer("getFourierTransformsAndCTFs"):
                    refs = None  # the other half's, freed before this one's are made
                    refs = steps.references(ctx, [state.maps[half - 1]], plan.map_radius)
                s = steps.weighted_sums(ctx, 1, plan.sampling.n_directions, state.stats[half - 1], plan.map_radius)
                prior = direction_log_prior(
                    state.direction_prior[half - 1], plan.sampling.n_directions, state.schedule.local_search
                )
                half_plan = replace(plan, settings=replace(plan.settings, direction_log_prior=prior))
                rows = np.flatnonzero(state.halves == half)
                avg_norm = steps.average_norm_correction(poses, rows, state.iteration) if cfg.norm else None
                progress = ctx.pool.progress(f"it{state.iteration}", bar)
                done.append(
                    steps.estep_pass(ctx, state, poses, half, rows, refs, half_plan, s, progress, avg_norm=avg_norm)
                )
                if park and half == 1:
                    steps.on_device(s.backprojectors, torch.device("cpu"))
                sums.append(s)
        return EStepOutput(sums, np.concatenate(done), note=park)

    # ------------------------------------------------------------------ M-step
    def conclude(
        self, ctx: RunContext, state: RunState, plan: steps.IterationPlan, estep: EStepOutput, poses: ParticlePoses
    ) -> tuple[RunState, dict, dict]:
        """RELION's gold-standard M-step: each half set's statistics from its own sums (pooled in the final iteration,
        when RELION joins the halves), the accumulators symmetrised and joined at low resolution (RELION's
        joinTwoHalvesAtLowResolution: up to --low_resol_join_halves or the current resolution, whichever is lower),
        compared, and reconstructed (mstep/maximize.py); then the schedule's next step. RELION keeps the initial σ²
        (and scales) after a cross-correlation iteration."""
        cfg, sums = ctx.cfg, estep.sums
        state, sch = state.with_schedule_copy()
        cc = steps.is_cc_iteration(ctx, state.iteration)
        steps.update_norm_corrections(ctx, poses, state.halves - 1, state.iteration)
        pooled = [sums] * 2 if sch.final_iteration else [[s] for s in sums]
        stats = tuple(
            updated_statistics(st, ss, cfg.min_sigma2_offset, noise=not cc, scale=cfg.scale and not cc)
            for st, ss in zip(state.stats, pooled)
        )
        if cfg.scale and not cc and len(ctx.groups.names) > 1:
            ctx.log.line(f"half set 1: {scale_spread(stats[0].scale)}")
        joined = JOINED_BYTES_PER_VOXEL if sch.final_iteration else 0  # the final map's joined accumulators
        bps = [s.backprojectors[0] for s in sums]
        max_shell = ctx.box // 2 if sch.final_iteration else plan.window_shell
        where = steps.mstep_plan(ctx, plan, bps, max_shell, joined)
        bps = steps.on_device(bps, where.device)
        for bp in bps:
            symmetrise_backprojector(bp, cfg.sym)
        if cfg.low_resol_join_halves > 0 and not sch.final_iteration:
            current = shell_to_angstrom(sch.current_resolution_shell, ctx.box, cfg.angpix)
            join_at_low_resolution_(bps, max(cfg.low_resol_join_halves, current), cfg.angpix)
        where, m = steps.maximized(
            ctx,
            where,
            bps,
            lambda bps, slabs: maximize_half_sets(
                bps,
                [float(s.class_weight.sum()) for s in sums],
                plan.window_shell,
                cfg.tau2_fudge,
                0 if cfg.skip_gridding else GRIDDING_ITERATIONS,
                sch.final_iteration,
                settle=lambda: pause_point("mstep", state.iteration, ctx.writer.wait),
                solvent_mask=ctx.solvent_mask if cfg.solvent_correct_fsc else None,
                devices=slabs,
            ),
        )
        # RELION's updateCurrentResolution keeps --ini_high for the iteration after the CC one
        res_shell = steps.ini_shell(ctx) if cc else m.resolution_shell
        res_angst = shell_to_angstrom(res_shell, ctx.box, cfg.angpix)
        if sch.final_iteration:
            maps = state.maps
        else:
            assert m.references is not None
            maps = steps.new_references(ctx, m.references, state.iteration)
        changes = steps.pose_changes(ctx, state.poses, poses)
        record = {
            **steps.base_record(ctx, state, plan, poses, changes, {}),
            "resolution_angst": res_angst,
            "posterior_spread_px": float(np.median(poses.offset_spread_px)),
            "sigma_offset_angst": math.sqrt(stats[0].sigma2_offset_angst2),
            "accuracy_rotation_deg": plan.accuracy[0],
            "accuracy_offset_px": plan.accuracy[1],
            "final": sch.final_iteration,
            "note": plan.note,
            "memory": steps.memory_note(where.note, estep.note),
        }
        if not sch.final_iteration:
            sch.update_after_halves_fsc(m.fsc, plan.window_shell)
            # one class: RELION counts iteration 1 as the one that gave every particle its class (the input's is not 1)
            sch.update_changes(*changes, change_classes=1.0 if state.iteration == 1 else 0.0)
            sch.update_resolution(res_shell)
            record.update({"incr_size": sch.incr_size, "has_high_fsc_at_limit": sch.has_high_fsc_at_limit})
        # RELION's data_vs_prior_class in auto-refine: T·FSC/(1 − FSC) of the halves (the next E-step's scale shells)
        ssnr = fsc_to_ssnr(m.fsc, cfg.tau2_fudge, whole=sch.final_iteration)[None]
        new = replace(
            state,
            maps=maps,
            stats=tuple(replace(st, data_vs_prior=ssnr) for st in stats),
            poses=poses,
            fsc=m.fsc,
            direction_prior=[direction_prior(s.direction_weight.cpu()) for s in sums],
        )
        info = {"resolution_angst": res_angst, "window_shell": plan.window_shell, "accuracy": plan.accuracy, "m": m}
        return new, record, info

    # ------------------------------------------------------------------ files
    def _model_tables(self, ctx: RunContext, state: RunState, info: dict, model: int) -> tuple:
        """model.star's tables of ``model`` (the half set − 1; in the final iteration the halves' pooled statistics,
        the same for both); model_classes without its map (rlnReferenceImage, one per file: _write_model)."""
        stats, m = state.stats[model], info["m"]
        rows = slice(None) if state.schedule.final_iteration else np.flatnonzero(state.halves - 1 == model)
        general = model_general(ctx, state, stats, rows, info["resolution_angst"], info["window_shell"])
        ssnr, completeness = fsc_to_ssnr(state.fsc), m.completeness[min(model, len(m.completeness) - 1)]
        classes = [
            {
                "rlnClassDistribution": 1.0,
                "rlnAccuracyRotations": info["accuracy"][0],
                "rlnAccuracyTranslationsAngst": info["accuracy"][1] * ctx.angpix,
                "rlnEstimatedResolution": info["resolution_angst"],
                "rlnOverallFourierCompleteness": overall_completeness(completeness, ssnr),
            }
        ]
        tau2 = m.tau2[min(model, len(m.tau2) - 1)]
        half = class_table(ctx, tau2, ssnr, completeness, state.fsc)
        directions = direction_tables(state.direction_prior[model])
        return general, classes, [half], groups_table(ctx, stats), noise_tables(ctx, stats), directions

    def write_files(self, ctx: RunContext, state: RunState, info: dict) -> list[str] | None:
        """The iteration's files (RELION's names); the last iteration's side by side (FINAL_FILE_THREADS): the run's
        end waits for them."""
        cfg, m, final = ctx.cfg, info["m"], state.schedule.final_iteration
        pre = it_prefix(ctx.root, state.iteration)
        volume = m.final_map if final else state.maps[0]  # first: the report's worker draws while the files are written
        steps.submit_report(ctx, state, state.fsc.numpy(), volume, force=final)
        halves = [f"{pre}_half{h}_class001.mrc" for h in (1, 2)]
        # per half set: its model.star files, each naming its map
        models = [[(f"{pre}_half{h}_model.star", halves[h - 1])] for h in (1, 2)]
        data_files = [f"{pre}_data.star"]
        if final:  # the seven maps of three (write_maps writes each once, then copies its file)
            unfil = [f"{pre}_half{h}_class001_unfil.mrc" for h in (1, 2)]
            finals = [f"{ctx.root}_class001.mrc", *(f"{ctx.root}_half{h}_class001_unfil.mrc" for h in (1, 2))]
            paths, maps = [*halves, *unfil, *finals], [*m.unfiltered, *m.unfiltered, m.final_map, *m.unfiltered]
            models[0].append((f"{ctx.root}_model.star", f"{ctx.root}_class001.mrc"))  # half set 1's tables, once
            data_files.append(f"{ctx.root}_data.star")  # the same text as the iteration's
        else:
            paths, maps = halves, list(state.maps)
        columns = data_columns(ctx, state, random_subset=True)
        jobs = [
            partial(write_maps, paths, maps, cfg.angpix),
            *(partial(self._write_model, ctx, state, info, model, files) for model, files in enumerate(models)),
            partial(write_particles, data_files, ctx.table, **columns),
            partial(write_sampling, ctx, state, pre),
        ]
        if final:
            p = state.poses
            radius = cfg.particle_diameter / (2 * cfg.angpix)
            bild = f"{ctx.root}_class001_angdist.bild"
            jobs.append(partial(write_angdist_bild, bild, p.rot_deg, p.tilt_deg, radius, ctx.box // 2, cfg.angpix))
        side_by_side(jobs, FINAL_FILE_THREADS if final else 1)
        # the final iteration's half maps are the unfiltered ones: the checkpoint keeps the maps themselves
        return None if final else halves

    def _write_model(self, ctx: RunContext, state: RunState, info: dict, model: int, files: list[tuple[str, str]]):
        """model.star of ``model`` (the half set − 1) at each (path, map) of ``files``, naming that map: the tables
        made once."""
        general, classes, *tables = self._model_tables(ctx, state, info, model)
        for path, reference in files:
            write_model_star(path, general, [{"rlnReferenceImage": reference, **classes[0]}], *tables)

    def summary(self, ctx: RunContext, state: RunState) -> dict:
        return {
            "final_resolution_angst": state.history[-1]["resolution_angst"],
            "iterations": state.iteration,
            "output": f"{ctx.root}_class001.mrc",
        }


def load_or_start(mode, ctx: RunContext) -> RunState:
    """The state of a new run (from --ref) or of the run --continue names."""
    if ctx.cfg.continue_from:
        state = from_checkpoint(read_state(ctx.cfg.continue_from), len(ctx.table))
        ctx.log.line(f"continuing after iteration {state.iteration} from {ctx.cfg.continue_from}")
        one_model = len(state.stats) == 1  # classification's (K maps); else auto-refine's half sets (a map each)
        model = np.zeros(len(ctx.table), np.int64) if one_model else state.halves - 1
        classes, g = len(state.maps) if one_model else 1, ctx.groups
        stats = (upgraded(s, g.of_particle, model == h, len(g.names), classes) for h, s in enumerate(state.stats))
        return replace(state, stats=tuple(stats))
    return mode.initial_state(ctx, read_map(ctx.cfg.reference)[0])


def refine(cfg: RefineConfig, dist: Dist | None = None, table: ParticleTable | None = None) -> dict:
    """Auto-refine (``cryorefine refine``): returns the run's summary. ``table``: cfg.particles already read (by
    validate.py), else read here."""
    mode = AutoRefineMode()
    with output_lock(cfg, dist):  # before open_run writes anything
        ctx = open_run(cfg, dist, ESTEP_VOLUMES, table)
        return run(mode, ctx, load_or_start(mode, ctx))
