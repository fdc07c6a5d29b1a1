"""3D classification: K references on the same E-step engine (the class is one more dimension of the products), as a
mode of the run's loop (loop.py).

RELION's scheme: K copies of the low-passed reference; in the first iteration (the second with --firstiter_cc)
each particle is held to a random class with a full pose search; then the E-step marginalises over classes and
poses; the M-step reconstructs each class with τ² from the power of the reference the E-step used (× --tau2_fudge),
and updates the class priors, the direction priors, σ² and the offset prior. Fixed sampling (optionally local
searches, --sigma_ang).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..debug_hooks import pause_point
from ..errors import CryoInputError
from ..io.mrc import write_maps
from ..io.outputs import it_prefix, write_model_star
from ..io.particles import write_particles
from ..io.table import ParticleTable
from ..mstep.maximize import maximize_classes
from ..mstep.priors import class_prior, direction_log_prior, direction_prior
from ..mstep.statistics import scale_spread, updated_statistics
from ..mstep.tau2 import tau2_from_reference
from ..parallel.context import Dist
from ..reconstruction.fsc import shell_to_angstrom
from ..reconstruction.reconstruct import GRIDDING_ITERATIONS, overall_completeness
from ..reconstruction.symmetrise import symmetrise_backprojector
from . import steps
from .auto_refine import halves_of, initial_schedule, initial_statistics, load_or_start, start_map
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
from .state import ClassState, RunState

MIN_CLASS_FOR_ACCURACY = 0.01  # RELION estimates the accuracy of classes holding at least this fraction


@dataclass(frozen=True)
class ClassifyConfig(RefineConfig):
    K: int = 3
    tau2_fudge: float = 4.0
    max_iter: int = 25
    ini_high: float = 60.0
    skip_align: bool = False  # RELION's --skip_align: classes only, at each particle's pose from the STAR
    skip_rotate: bool = False  # RELION's --skip_rotate: classes and offsets, at each particle's orientation


def fixed_poses(cfg) -> str:
    """EStepPass.fixed_poses of a configuration: "skip_align", "skip_rotate" or "" (both: --skip_align wins, as in
    RELION, where it implies --skip_rotate)."""
    if getattr(cfg, "skip_align", False):
        return "skip_align"
    return "skip_rotate" if getattr(cfg, "skip_rotate", False) else ""


class ClassifyMode:
    command = "classify"

    def __init__(self, K: int):
        self.K = K

    def describe(self, ctx: RunContext) -> str:
        return f"K={self.K}"

    def initial_state(self, ctx: RunContext, reference: np.ndarray) -> RunState:
        cfg, n, K = ctx.cfg, len(ctx.table), self.K
        if fixed_poses(cfg) and not ctx.table.has_angles:
            raise CryoInputError(
                f"--{fixed_poses(cfg)} keeps each particle's orientation, but the particles have no "
                "rlnAngleRot/Tilt/Psi; give a refinement's run_data.star",
                path=cfg.particles,
            )
        start = start_map(ctx, reference)
        schedule = initial_schedule(ctx)
        return RunState(
            iteration=0,
            perturbation=0.0,
            rng_state=np.random.default_rng(cfg.random_seed).bit_generator.state,
            maps=tuple(start.clone() for _ in range(K)),
            stats=initial_statistics(ctx, np.zeros(n, dtype=np.int64), 1, start, K),  # one model for all particles
            schedule=schedule,
            poses=ParticlePoses.from_table(ctx.table),
            halves=halves_of(ctx.table, cfg.random_seed),
            history=(),
            fsc=torch.zeros(ctx.box // 2 + 1, dtype=torch.float64),
            direction_prior=None,
            # RELION: the random class each particle is held to in the first iteration, drawn from its seed
            classes=ClassState(
                torch.full((K,), 1.0 / K, dtype=torch.float64),
                (schedule.current_resolution_shell,) * K,
                np.random.default_rng(cfg.random_seed + 1).integers(0, K, n),
            ),
        )

    def before_iteration(self, ctx: RunContext, state: RunState) -> RunState | None:
        return state if state.iteration < ctx.cfg.max_iter else None

    def is_final(self, state: RunState) -> bool:
        return False

    def plan(self, ctx: RunContext, state: RunState) -> tuple[steps.IterationPlan, RunState]:
        """Fixed sampling (each class's accuracy is estimated after its M-step, conclude); the window from the best
        class's resolution."""
        assert state.classes is not None
        window_shell = min(ctx.box // 2, max(state.classes.resolution_shell) + ctx.cfg.incr_size)
        perturbation, rng_state = steps.next_perturbation(ctx, state)
        state = replace(state, iteration=state.iteration + 1, perturbation=perturbation, rng_state=rng_state)
        plan = steps.plan_iteration(ctx, state, window_shell, steps.estep_settings(ctx, state), (999.0, 999.0), None)
        prior = direction_log_prior(state.direction_prior, plan.sampling.n_directions, state.schedule.local_search)
        return replace(plan, settings=replace(plan.settings, direction_log_prior=prior)), state

    def expectation(
        self, ctx: RunContext, state: RunState, plan: steps.IterationPlan, poses: ParticlePoses
    ) -> EStepOutput:
        """E-step of all particles against the K references (this rank's share)."""
        cfg, classes = ctx.cfg, state.classes
        assert classes is not None
        random_class_iter = 2 if cfg.firstiter_cc else 1
        host_refs = steps.references_on_host_note(ctx, plan, self.K)
        steps.check_estep_memory(ctx, plan, 2 if host_refs else self.K, self.K)
        with ctx.timer("getFourierTransformsAndCTFs"):
            refs = steps.references(ctx, state.maps, plan.map_radius, on_host=bool(host_refs))
            # RELION takes each class's τ² for this iteration's reconstruction from the reference as prepared here
            class_tau2 = [tau2_from_reference(r, plan.window_shell) for r in refs]
        sums = steps.weighted_sums(ctx, self.K, plan.sampling.n_directions, state.stats[0], plan.map_radius)
        forced = classes.initial_class if state.iteration <= random_class_iter else None
        rows = np.arange(len(ctx.table))
        avg_norm = steps.average_norm_correction(poses, rows, state.iteration) if cfg.norm else None
        with Progress(len(ctx.table), f"iteration {state.iteration:3d}", ctx.dist.is_main) as bar:
            progress = ctx.pool.progress(f"it{state.iteration}", bar)
            done = steps.estep_pass(
                ctx, state, poses, 0, rows, refs, plan, sums, progress, forced_class=forced, avg_norm=avg_norm,
                fixed_poses=fixed_poses(cfg),
            )  # fmt: skip
        return EStepOutput([sums], done, class_tau2, note=host_refs)

    def conclude(
        self, ctx: RunContext, state: RunState, plan: steps.IterationPlan, estep: EStepOutput, poses: ParticlePoses
    ) -> tuple[RunState, dict, dict]:
        """The classes' M-step (RELION keeps the initial σ² after a cross-correlation iteration, and --ini_high as the
        resolution for the iteration after it) and each class's expected accuracy."""
        cfg, sums, classes = ctx.cfg, estep.sums[0], state.classes
        assert estep.class_tau2 is not None and classes is not None
        cc = steps.is_cc_iteration(ctx, state.iteration)
        steps.update_norm_corrections(ctx, poses, np.zeros(len(ctx.table), dtype=np.int64), state.iteration)
        stats = (
            updated_statistics(state.stats[0], [sums], cfg.min_sigma2_offset, noise=not cc, scale=cfg.scale and not cc),
        )
        if cfg.scale and not cc and len(ctx.groups.names) > 1:
            ctx.log.line(scale_spread(stats[0].scale))
        where = steps.mstep_plan(ctx, plan, sums.backprojectors, plan.window_shell, 0)
        bps = steps.on_device(sums.backprojectors, where.device)
        for bp in bps:
            symmetrise_backprojector(bp, cfg.sym)
        class_tau2 = estep.class_tau2
        where, m = steps.maximized(
            ctx,
            where,
            bps,
            lambda bps, slabs: maximize_classes(
                bps,
                sums.class_weight.tolist(),
                class_tau2,
                cfg.tau2_fudge,
                plan.window_shell,
                0 if cfg.skip_gridding else GRIDDING_ITERATIONS,
                settle=lambda: pause_point("mstep", state.iteration, ctx.writer.wait),
                devices=slabs,
            ),
        )
        shells = (steps.ini_shell(ctx),) * self.K if cc else tuple(m.shells)
        new = replace(
            state,
            maps=steps.new_references(ctx, m.maps, state.iteration),
            stats=(replace(stats[0], data_vs_prior=torch.stack(m.ssnr)),),  # the next E-step's scale shells
            poses=poses,
            direction_prior=direction_prior(sums.direction_weight.cpu()),
            classes=replace(classes, prior=class_prior(sums.class_weight.cpu()), resolution_shell=shells),
        )
        assert new.classes is not None
        # RELION: each class of at least 1 % against all particles; 999 for the others; overall the smallest.
        # From this iteration's maps and poses: RELION writes the same estimate into the next iteration's model.star
        rows = np.arange(len(ctx.table))
        acc = [
            steps.accuracy_of(ctx, new, plan.window_shell, m, rows)
            if float(p) >= MIN_CLASS_FOR_ACCURACY
            else (999.0, 999.0)
            for m, p in zip(new.maps, new.classes.prior)
        ]
        best = max(shells)
        class_res = [shell_to_angstrom(s, ctx.box, cfg.angpix) for s in shells]
        record = {
            **steps.base_record(ctx, state, plan, poses, steps.pose_changes(ctx, state.poses, poses), {}),
            "resolution_angst": shell_to_angstrom(best, ctx.box, cfg.angpix),
            "change_class_fraction": float(np.mean(state.poses.class_number != poses.class_number)),
            "accuracy_rotation_deg": min(a[0] for a in acc),
            "accuracy_offset_px": min(a[1] for a in acc),
            "class_accuracy": [list(a) for a in acc],
            "class_distribution": new.classes.prior.tolist(),
            "class_resolution_angst": class_res,
            "sigma_offset_angst": float(stats[0].sigma2_offset_angst2 ** 0.5),
            "final": False,
            "memory": steps.memory_note(where.note, estep.note),
        }
        info = {
            "resolution_angst": record["resolution_angst"],
            "class_resolution_angst": class_res,
            "class_accuracy": record["class_accuracy"],
            "class_tau2": estep.class_tau2,
            "class_ssnr": m.ssnr,
            "class_completeness": m.completeness,
            "window_shell": plan.window_shell,
        }
        return new, record, info

    def write_files(self, ctx: RunContext, state: RunState, info: dict) -> list[str]:
        cfg, classes = ctx.cfg, state.classes
        assert classes is not None
        pre = it_prefix(ctx.root, state.iteration)
        n_sh = ctx.box // 2 + 1
        # first: the report's worker draws while the files are written
        biggest = state.maps[int(torch.argmax(classes.prior))]
        steps.submit_report(ctx, state, np.zeros(n_sh), biggest, force=state.iteration >= cfg.max_iter)
        files = [f"{pre}_class{k + 1:03d}.mrc" for k in range(self.K)]
        write_maps(files, state.maps, cfg.angpix)
        stats = state.stats[0]
        general = model_general(ctx, state, stats, slice(None), info["resolution_angst"], info["window_shell"])
        class_rows = [
            {
                "rlnReferenceImage": files[k],
                "rlnClassDistribution": float(classes.prior[k]),
                "rlnAccuracyRotations": info["class_accuracy"][k][0],
                "rlnAccuracyTranslationsAngst": min(999.0, info["class_accuracy"][k][1] * cfg.angpix),
                "rlnEstimatedResolution": info["class_resolution_angst"][k],
                "rlnOverallFourierCompleteness": overall_completeness(
                    info["class_completeness"][k], info["class_ssnr"][k]
                ),
            }
            for k in range(self.K)
        ]
        tables = [
            class_table(ctx, t.cpu(), r, c)
            for t, r, c in zip(info["class_tau2"], info["class_ssnr"], info["class_completeness"])
        ]
        write_model_star(
            f"{pre}_model.star",
            general,
            class_rows,
            tables,
            groups_table(ctx, stats),
            noise_tables(ctx, stats),
            direction_tables(state.direction_prior),
        )
        write_particles(f"{pre}_data.star", ctx.table, **data_columns(ctx, state, random_subset=False))
        write_sampling(ctx, state, pre)
        return files

    def summary(self, ctx: RunContext, state: RunState) -> dict:
        assert state.classes is not None
        return {
            "iterations": state.iteration,
            "class_distribution": [round(float(x), 4) for x in state.classes.prior],
            "class_resolution_angst": state.history[-1]["class_resolution_angst"],
        }


def classify(cfg: ClassifyConfig, dist: Dist | None = None, table: ParticleTable | None = None) -> dict:
    """3D classification (``cryorefine classify``): returns the run's summary. ``table``: cfg.particles already read
    (by validate.py), else read here."""
    if cfg.K < 1:
        raise CryoInputError(f"--K must be at least 1 (got {cfg.K})")
    mode = ClassifyMode(cfg.K)
    with output_lock(cfg, dist):  # before open_run writes anything
        ctx = open_run(cfg, dist, {"references": cfg.K, "backprojectors": cfg.K, "whole": False}, table)
        return run(mode, ctx, load_or_start(mode, ctx))
