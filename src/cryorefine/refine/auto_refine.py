"""3D auto-refine: gold-standard MAP-EM with RELION's schedule (random halves, FSC-driven τ², finer sampling, final join)."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import DistributedError
from ..estep.settings import EStepSettings
from ..estep.images import Window, ctf_and_inverse_noise
from ..estep.memory import available_bytes, check_fixed_volumes, fixed_volume_bytes, image_cache_bytes
from ..estep.poses import PoseGrid
from ..estep.sums import WeightedSums
from ..fourier.filters import low_pass_filter
from ..geometry.healpix import angular_step_deg, make_sampling, next_random_perturbation
from ..io.atomic import remove_stale_temporaries
from ..io.background import BackgroundWriter
from ..io.image_cache import ImageCache
from ..io.mrc import read_map, write_map
from ..io.outputs import it_prefix, write_angdist_bild, write_model_star, write_sampling_star
from ..io.particles import load_particles, write_particles
from ..io.table import ParticleTable
from ..io.star import write_star_table
from ..mstep.noise import initial_sigma2
from ..mstep.norm import updated_norm_corrections
from ..mstep.statistics import ModelStatistics, updated_statistics
from ..mstep.priors import direction_log_prior, direction_prior
from ..mstep.maximize import joined_at_low_resolution, maximize_half_sets
from ..parallel.collectives import all_reduce_sum_, broadcast_from_main, broadcast_tensors_, merge_rows_, per_rank
from ..parallel.context import Dist
from ..parallel.pool import TaskPool
from ..debug_hooks import pause_point
from ..reconstruction.fsc import fsc_to_ssnr, shell_to_angstrom
from ..reconstruction.reconstruct import GRIDDING_ITERATIONS
from ..reconstruction.symmetrise import symmetrise_backprojector
from ..transfer import to_device
from ..validate import (
    check_diameter_fits,
    check_diameter_sign,
    check_one_pixel_size,
    check_random_subsets,
    check_reference,
)
from .accuracy import N_TRIALS, expected_accuracy
from .engine import (
    EStepPass,
    EStepRuntime,
    ParticlePoses,
    angular_change_deg,
    prepare_references,
    run_expectation,
    solvent_masked,
)
from .log import RunLog
from .progress import Progress
from ..fourier.grids import relion_round
from .schedule import Schedule, strict_window_shell
from .state import read_state, saved_maps
from .timing import StageTimer, profiled


@dataclass
class RefineConfig:
    particles: str
    output_root: str
    reference: str
    ini_high: float = 30.0
    particle_diameter: float = 0.0
    sym: str = "C1"
    healpix_order: int = 2
    offset_range: float = 5.0  # pixels
    offset_step: float = 2.0  # pixels
    sigma_offset: float = 10.0  # Å: initial width of the offset prior (RELION's --offset)
    min_sigma2_offset: float = 2.0  # Å²: lower bound of the offset prior's variance (RELION 5)
    auto_local_healpix_order: int = 4
    sigma_ang: float = 0.0
    low_resol_join_halves: float = 40.0
    solvent_mask: str | None = None
    flatten_solvent: bool = False
    zero_mask: bool = False
    ctf: bool = False
    norm: bool = False
    scale: bool = False
    firstiter_cc: bool = False
    pad: int = 2
    maxsig: int = 0
    random_seed: int = 0
    perturb: float = 0.5
    incr_size: int = 10
    strict_highres_exp: float = 0.0  # Å; > 0 scores poses and classes only up to this resolution
    adaptive_fraction: float = 0.999
    tau2_fudge: float = 1.0
    skip_gridding: bool = False  # RELION >= 4's reconstruction; default RELION 3.1's gridding iterations
    max_iter: int = 999  # RELION's --auto_iter_max
    batch_size: int = 0  # 0: automatic
    max_seconds: float = 0.0  # > 0: stop cleanly before an iteration that would end past this many seconds of this call
    precision: str = "fp32"  # coarse-pass matrix products: fp32, tf32 or fp16
    image_cache: bool = True  # on a GPU, keep the particle images there after their first read while they fit
    device: str = "cpu"
    threads: int = 0
    continue_from: str | None = None
    # filled in at run time
    angpix: float = field(default=0.0)
    solvent_mask_volume: torch.Tensor | None = field(default=None, repr=False)


REPORT_INTERVAL_S = 30.0  # report.html is refreshed at most this often during a run (and always at its end)
BATCHES_PER_RANK = 8  # per iteration, at least, under torchrun with several ranks (the pool's granularity)


def auto_batch_size(n_particles: int, world_size: int, on_gpu: bool) -> int:
    """Particles per E-step batch for --batch 0: 1024 on a GPU, 256 on the CPU. With several ranks, smaller batches
    so that each rank gets about BATCHES_PER_RANK of an iteration's batches or more (the pool balances ranks only batch
    by batch): n / (8 · ranks), rounded down to a multiple of 32, at least 64 (and never above the one-process size)."""
    base = 1024 if on_gpu else 256
    if world_size <= 1:
        return base
    share = math.ceil(n_particles / (BATCHES_PER_RANK * world_size))
    return min(base, max(64, share // 32 * 32))


def _halves(table: ParticleTable, seed: int) -> np.ndarray:
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


@dataclass
class IterationPlan:
    """What one iteration's E-step needs: orientations and pose grid, Fourier windows (shells), settings."""

    sampling: object
    grid: PoseGrid
    window: Window
    window_shell: int
    coarse_shell: int
    settings: EStepSettings


class AutoRefine:
    """One auto-refine run. ``run()`` iterates until convergence, then does the final joined iteration.

    Under torchrun (``dist``) every rank takes E-step batches from a shared pool; the accumulators and per-particle
    results are combined over ranks; rank 0 does the M-step, writes the files and sends its state to the others.
    """

    command = "refine"

    def __init__(self, cfg: RefineConfig, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist if dist is not None else Dist(device=cfg.device)
        self.pool = TaskPool(self.dist)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.table = load_particles(cfg.particles)
        # the CLI validated these already (validate.py); a program that builds the engine itself gets the same checks
        cfg.angpix = check_one_pixel_size(self.table)
        check_diameter_sign(cfg.particle_diameter)
        check_reference(cfg.reference, self.table.box, cfg.angpix)
        check_diameter_fits(cfg.particle_diameter, self.table.box, cfg.angpix)
        ref, _ = read_map(cfg.reference)
        if cfg.solvent_mask:
            check_reference(cfg.solvent_mask, self.table.box, cfg.angpix, what="solvent mask")
            cfg.solvent_mask_volume = torch.from_numpy(read_map(cfg.solvent_mask)[0]).float()
        self.box = self.table.box
        self.device = torch.device(cfg.device)
        self.n_groups = len(self.table.optics)
        self.root = cfg.output_root
        Path(self.root).parent.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:  # only rank 0 writes files (temporaries are named by pid, which other hosts cannot check)
            remove_stale_temporaries(Path(self.root).parent)  # left by a killed run
        self.log = RunLog(Path(self.root).parent / "run.log", enabled=self.dist.is_main)
        self.timer = StageTimer(self.device)
        self.halves = _halves(self.table, cfg.random_seed)
        self.rng = np.random.default_rng(cfg.random_seed)
        self.iteration = 0
        self.perturbation = 0.0
        self._clock = time.perf_counter()  # start of the current iteration (see iterate)
        self._writer = BackgroundWriter()  # rank 0's files of an iteration, written while the next one computes
        # the first refresh REPORT_INTERVAL_S into the run (its plots would hold the interpreter lock in iteration 2)
        self._report_state = {
            "written": time.monotonic(),
            "pending": None,
        }  # shared with the writer's snapshots (_report)
        if cfg.continue_from:
            self._load_state(cfg.continue_from)
        else:
            start = low_pass_filter(torch.from_numpy(ref).double(), cfg.ini_high, cfg.angpix).float()
            self.maps = [start.clone(), start.clone()]
            self.poses = ParticlePoses.from_table(self.table)
            # RELION masks the images for the initial power spectra only with --zero_mask (without it, the E-step fills
            # the area outside the mask with noise of this σ²: a masked spectrum would be the mask's area fraction too small)
            mask_radius_px = cfg.particle_diameter / (2 * cfg.angpix) if cfg.zero_mask else None
            sigma2 = initial_sigma2(
                self.table, self.n_groups, self._model_of_particle(), device=self.device, mask_radius_px=mask_radius_px
            )
            self.stats = [ModelStatistics.initial(s, cfg.sigma_offset) for s in sigma2]
            self.schedule = Schedule(
                cfg.healpix_order,
                cfg.offset_range,
                cfg.offset_step,
                current_resolution_shell=self._ini_shell(),
                incr_size=cfg.incr_size,
            )
            if cfg.sigma_ang > 0:
                self.schedule.local_search, self.schedule.sigma_ang_deg = True, cfg.sigma_ang
            self.history = []
            self.fsc = torch.zeros(self.box // 2 + 1, dtype=torch.float64)
            self.direction_prior = [
                None,
                None,
            ]  # per half set: RELION's pdf_direction (mstep/priors.py), uniform at first
        self.tau2 = [torch.zeros(self.box // 2 + 1, dtype=torch.float64)]  # the last M-step's τ² per model (none yet)
        self._check_device_memory()
        self.images = self._image_cache()

    # ------------------------------------------------------------------ memory
    def _fixed_volumes(self) -> dict:
        """What the device holds at once: one half set's reference at a time, both half sets' accumulators, their sum."""
        return {"references": 1, "backprojectors": 2, "join_halves": self.cfg.low_resol_join_halves > 0}

    def _check_device_memory(self) -> None:
        """Stop before the first iteration, with one line, when the GPU cannot hold the references and accumulators."""
        free = available_bytes(self.device)
        if free is not None:
            check_fixed_volumes(self.box, self.cfg.pad, symmetry=self._symmetry(), free=free, **self._fixed_volumes())

    def _symmetry(self) -> bool:
        return self.cfg.sym.upper() != "C1"

    def _fixed_volume_sizes(self) -> dict[str, int]:
        return fixed_volume_bytes(self.box, self.cfg.pad, symmetry=self._symmetry(), **self._fixed_volumes())

    def _image_cache(self) -> ImageCache:
        """The GPU's cache of particle images (capacity 0 on the CPU or with --no_image_cache)."""
        per_image = 4 * self.box * self.box
        room = (
            image_cache_bytes(self.device, sum(self._fixed_volume_sizes().values()), self.dist.device_peers)
            if self.cfg.image_cache
            else 0
        )
        cache = ImageCache(len(self.table), self.box, room // per_image, self.device)
        if self.device.type == "cuda":
            self.log.line(
                f"GPU image cache: {cache.capacity} of {len(self.table)} particles ({cache.nbytes / 2**30:.2f} GiB)"
                + ("" if self.cfg.image_cache else "; off (--no_image_cache)")
            )
        return cache

    # ------------------------------------------------------------------ one iteration
    def _batch_size(self) -> int:
        if self.cfg.batch_size > 0:
            return self.cfg.batch_size
        return auto_batch_size(len(self.table), self.dist.world_size, self.device.type == "cuda")

    def _ini_shell(self) -> int:
        """RELION's resolution before the first iteration: the shell of --ini_high."""
        return max(1, relion_round(self.box * self.cfg.angpix / self.cfg.ini_high))

    def _model_of_particle(self) -> np.ndarray:
        """(n,) which model's statistics (self.stats) each particle's E-step reads and its M-step updates: its half set's."""
        return self.halves - 1

    def _window_shell(self) -> int:
        ave_pmax = self.history[-1]["mean_max_prob"] if self.history else 0.0
        return self.schedule.window_shell(self.box, ave_pmax)

    def _settings(self, sampling) -> EStepSettings:
        cfg, sch = self.cfg, self.schedule
        return EStepSettings(
            adaptive_fraction=cfg.adaptive_fraction,
            maxsig=cfg.maxsig,
            firstiter_cc=cfg.firstiter_cc and self.iteration == 1,
            local_sigma_deg=sch.sigma_ang_deg if sch.local_search else 0.0,
            sigma2_offset_angst2=self.stats[0].sigma2_offset_angst2,
            angpix=cfg.angpix,
            precision=cfg.precision,
        )

    def plan_iteration(self) -> IterationPlan:
        """Next iteration's number, grid perturbation, pose grid, E-step windows and settings."""
        cfg, sch = self.cfg, self.schedule
        window_shell = self._window_shell()
        self.iteration += 1
        self.perturbation = next_random_perturbation(self.perturbation, cfg.perturb, self.rng)
        self._sampling_note = self._update_sampling(window_shell)
        sampling = make_sampling(sch.healpix_order, cfg.sym, self.perturbation)
        grid = PoseGrid.build(sampling, sch.offset_range_px, sch.offset_step_px, device=self.device)
        # --strict_highres_exp (RELION's meaning): both passes score up to that shell (it replaces the adaptive coarse
        # size); reconstruction and σ² still use the whole window
        score_shell = strict_window_shell(window_shell, self.box, cfg.angpix, cfg.strict_highres_exp)
        coarse_shell = (
            score_shell
            if cfg.strict_highres_exp > 0
            else sch.coarse_shell(window_shell, self.box, cfg.angpix, cfg.particle_diameter)
        )
        settings = replace(self._settings(sampling), score_shell=score_shell)
        return IterationPlan(
            sampling, grid, Window.build(self.box, window_shell, self.device), window_shell, coarse_shell, settings
        )

    def _update_sampling(self, window_shell: int) -> str | None:
        """RELION, before each E-step: the expected accuracy of the current poses and map (half 1) over this iteration's
        window, then, from the second iteration on, updateAngularSampling (finer sampling, or fine enough)."""
        cfg = self.cfg
        if cfg.firstiter_cc and self.iteration == 1:  # RELION: no accuracy for the cross-correlation iteration
            self._accuracy = (999.0, 999.0)
            return None
        # rank 0's estimate on every rank: the sampling it decides must be the same everywhere
        acc = (
            self._expected_accuracy(window_shell, self.maps[0], np.flatnonzero(self.halves == 1))
            if self.dist.is_main
            else None
        )
        self._accuracy = broadcast_from_main(acc, self.dist, "sharing the expected accuracy with rank 0")
        if self.iteration < 2:
            return None
        return self.schedule.update_angular_sampling(
            self._accuracy[0], cfg.auto_local_healpix_order, self._accuracy[1], cfg.angpix
        )

    def _estep_pass(
        self, half: int, rows: np.ndarray, refs, plan: IterationPlan, sums: WeightedSums, progress, **kw
    ) -> np.ndarray:
        """This rank's batches of one E-step pass over ``rows`` (``half``: 1, 2, or 0 for all); returns the rows it did."""
        key = f"it{self.iteration}/half{half}"
        stats = self.stats[max(half - 1, 0)]
        settings = replace(plan.settings, sigma2_offset_angst2=stats.sigma2_offset_angst2)
        job = EStepPass(
            refs,
            plan.grid,
            plan.window,
            plan.coarse_shell,
            stats.sigma2.to(self.device),
            stats.scale,
            settings,
            local=self.schedule.local_search,
            **kw,
        )
        runtime = EStepRuntime(
            self.cfg,
            (self.cfg.random_seed, self.iteration, half),
            self.timer,
            progress,
            self._batch_size(),
            tasks=lambda n: self.pool.take(key, n),
            cache=self.images,
        )
        return run_expectation(self.table, rows, self.poses, job, sums, runtime)

    def _combine(self, sums: list[WeightedSums], done: np.ndarray) -> dict:
        """Accumulators summed and per-particle results gathered over ranks; returns each rank's batches and E-step
        seconds (from its iteration's start to its last batch's end: the slowest sets when the all-reduce ends)."""
        if self.dist.world_size > 1 and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        estep_s = time.perf_counter() - self._clock
        with self.timer("combine ranks"):
            for s in sums:
                all_reduce_sum_(s.tensors(), self.dist)
            merge_rows_(list(self.poses.as_dict().values()), done, self.dist)
            ranks = per_rank([self.pool.taken_since_last_call(), estep_s], self.dist)
        return {"batches_per_rank": [int(r[0]) for r in ranks], "estep_s_per_rank": [round(r[1], 3) for r in ranks]}

    def _average_norm_correction(self, rows: np.ndarray) -> float:
        """RELION's avg_norm_correction of the model of ``rows``: 1 in a run's first iteration (whatever the input's
        rlnNormCorrection), then the mean of the corrections the last E-step estimated for them."""
        return 1.0 if self.iteration == 1 else float(np.mean(self.poses.norm_correction[rows]))

    def _update_norm_corrections(self) -> None:
        """--norm, in the M-step: each particle's rlnNormCorrection from its residual power in the E-step just done,
        relative to its model's average that the E-step used (mstep/norm.py)."""
        if not self.cfg.norm:
            return
        p, model = self.poses, self._model_of_particle()
        for m in np.unique(model):
            rows = np.flatnonzero(model == m)
            avg = self._average_norm_correction(rows)
            p.norm_correction[rows] = updated_norm_corrections(
                p.norm_correction[rows], avg, p.residual_power[rows], self.box
            )

    def _progress(self, bar):
        return self.pool.progress(f"it{self.iteration}", bar)

    def expectation(self, plan: IterationPlan) -> tuple[list[WeightedSums], dict]:
        """E-step of both half sets (this rank's share), combined over ranks: (sums per half, per-rank figures)."""
        cfg = self.cfg
        sums, done = [], []
        with Progress(len(self.table), f"iteration {self.iteration:3d}", self.dist.is_main) as bar:
            for half in (1, 2):
                with self.timer("getFourierTransformsAndCTFs"):
                    refs = prepare_references([self.maps[half - 1]], cfg.pad, self.device)
                s = WeightedSums.zeros(
                    1, self.box, cfg.pad, self.n_groups, plan.sampling.n_directions, device=self.device
                )
                # each half set's own learned direction prior in global searches, as RELION's two half models
                prior = direction_log_prior(
                    self.direction_prior[half - 1], plan.sampling.n_directions, self.schedule.local_search
                )
                half_plan = replace(plan, settings=replace(plan.settings, direction_log_prior=prior))
                rows = np.flatnonzero(self.halves == half)
                avg_norm = self._average_norm_correction(rows) if cfg.norm else None
                done.append(self._estep_pass(half, rows, refs, half_plan, s, self._progress(bar), avg_norm=avg_norm))
                sums.append(s)
                if half == 1:
                    pause_point("estep", self.iteration, self._writer.wait)
        return sums, self._combine(sums, np.concatenate(done))

    def iterate(self) -> dict:
        """One iteration on every rank: E-step, rank 0's M-step, rank 0's state to every rank, rank 0's files and log."""
        plan = self.plan_iteration()
        previous = ParticlePoses(**{k: v.copy() for k, v in self.poses.as_dict().items()})
        sums, ranks = self.expectation(plan)
        if self.dist.is_main:
            record, info = self._conclude(plan, sums, previous, ranks)
            self.history.append(record)
        else:  # rank 0's record holds rank 0's stage times and counters
            self.timer.reset()
            self.timer.reset_counters()
        self._share_state()
        self._clock = (
            time.perf_counter()
        )  # an iteration's seconds run from here: rank 0's writing below overlaps the next E-step
        if self.dist.is_main:
            # after sharing: the other ranks start the next E-step meanwhile, and the pool gives rank 0 fewer batches
            self.log.iteration(record)
            self.write_iteration(info, record)
        return self.history[-1]

    def _pose_changes(self, previous: ParticlePoses) -> tuple[float, float]:
        """Mean angular change (°, RELION's symmetry-aware measure) and rms offset change (px) since ``previous``."""
        p = self.poses
        d_ang = angular_change_deg(
            previous.rot_deg, previous.tilt_deg, previous.psi_deg, p.rot_deg, p.tilt_deg, p.psi_deg, self.cfg.sym
        )
        d_off = (
            np.hypot(previous.origin_x_angst - p.origin_x_angst, previous.origin_y_angst - p.origin_y_angst)
            / self.cfg.angpix
        )
        return float(np.mean(d_ang)), float(np.sqrt(np.mean(d_off**2)))

    def _conclude(
        self, plan: IterationPlan, sums: list[WeightedSums], previous: ParticlePoses, ranks: dict
    ) -> tuple[dict, dict]:
        """Rank 0: M-step and the schedule's next step; returns the iteration's record and the M-step's info."""
        sch = self.schedule
        with self.timer("M-step"):
            info = self.maximization(sums, plan.window_shell)
        change_ang, change_off = self._pose_changes(previous)
        record = {
            "iteration": self.iteration,
            "resolution_angst": info["resolution_angst"],
            "healpix_order": sch.healpix_order,
            "local": sch.local_search,
            "window_shell": plan.window_shell,
            "coarse_shell": plan.coarse_shell,
            "change_orientation_deg": change_ang,
            "change_offset_px": change_off,
            "mean_significant": float(np.mean(self.poses.n_significant)),
            "mean_max_prob": float(np.mean(self.poses.max_prob)),
            "posterior_spread_deg": float(np.median(self.poses.angular_spread_deg)),
            "posterior_spread_px": float(np.median(self.poses.offset_spread_px)),
            "sigma_offset_angst": math.sqrt(self.stats[0].sigma2_offset_angst2),
            **ranks,
        }
        record["accuracy_rotation_deg"], record["accuracy_offset_px"] = self._accuracy
        record.update(
            {
                "seconds": time.perf_counter() - self._clock,
                "stages": self.timer.reset(),
                "final": sch.final_iteration,
                "counters": self.timer.reset_counters(),
                "note": self._sampling_note,
            }
        )
        if not sch.final_iteration:
            sch.update_after_halves_fsc(info["fsc"], plan.window_shell)
            # one class: RELION counts iteration 1 as the one that gave every particle its class (the input's is not 1)
            sch.update_changes(change_ang, change_off, change_classes=1.0 if self.iteration == 1 else 0.0)
            sch.update_resolution(info["resolution_shell"])
            record.update({"incr_size": sch.incr_size, "has_high_fsc_at_limit": sch.has_high_fsc_at_limit})
        return record, info

    def _expected_accuracy(self, window_shell: int, volume: torch.Tensor, rows: np.ndarray) -> tuple[float, float]:
        """RELION's expected accuracy (accuracy.py; degrees, pixels) of up to 100 of ``rows``, drawn anew each
        iteration (the same for every map), at their current poses against ``volume``, over ``window_shell`` (capped
        by --strict_highres_exp, as the E-step's scores)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.random_seed, self.iteration, 17])
        pick = np.sort(rng.choice(rows, min(N_TRIALS, len(rows)), replace=False))
        score_shell = strict_window_shell(window_shell, self.box, cfg.angpix, cfg.strict_highres_exp)
        window = Window.build(self.box, score_shell, self.device)
        ref = prepare_references([volume], cfg.pad, self.device)[0]
        group = to_device(self.table.optics_group[pick], self.device)
        ctf, inv_sigma2 = ctf_and_inverse_noise(
            self.table, pick, group, window, self.stats[0].sigma2.to(self.device), cfg.ctf, self.device
        )
        p = self.poses
        eulers = np.stack([p.rot_deg[pick], p.tilt_deg[pick], p.psi_deg[pick]], -1)
        return expected_accuracy(ref, eulers, ctf, inv_sigma2, window, rng)

    def _share_state(self) -> None:
        """Rank 0's model, schedule, poses and history on every rank, so that all plan the same next iteration."""
        if self.dist.world_size > 1:
            state = self._state() if self.dist.is_main else None
            if state is not None:  # the maps travel as tensors, the rest pickled
                maps = state.pop("maps")
                state["map_shapes"] = [(tuple(m.shape), m.dtype) for m in maps]
            state = broadcast_from_main(state, self.dist)
            if not self.dist.is_main:
                maps = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in state["map_shapes"]]
            broadcast_tensors_(maps, self.dist)
            if not self.dist.is_main:
                self._restore(dict(state, maps=maps))

    # ------------------------------------------------------------------ M-step
    def maximization(self, sums: list[WeightedSums], window_shell: int) -> dict:
        """RELION's gold-standard M-step: each half set's statistics from its own sums (pooled in the final iteration,
        when RELION joins the halves), the accumulators symmetrised and joined at low resolution (RELION's
        joinTwoHalvesAtLowResolution: up to --low_resol_join_halves or the current resolution, whichever is lower),
        compared, and reconstructed (mstep/maximize.py). RELION keeps the initial σ² (and scales) after a
        cross-correlation iteration."""
        cfg, sch = self.cfg, self.schedule
        cc_iteration = cfg.firstiter_cc and self.iteration == 1
        self._update_norm_corrections()
        pooled = [sums] * 2 if sch.final_iteration else [[s] for s in sums]
        self.stats = [
            updated_statistics(
                st, ss, cfg.min_sigma2_offset, noise=not cc_iteration, scale=cfg.scale and not cc_iteration
            )
            for st, ss in zip(self.stats, pooled)
        ]
        self.direction_prior = [direction_prior(s.direction_weight.cpu()) for s in sums]
        bps = [s.backprojectors[0] for s in sums]
        for bp in bps:
            symmetrise_backprojector(bp, cfg.sym)
        if cfg.low_resol_join_halves > 0 and not sch.final_iteration:
            current = shell_to_angstrom(sch.current_resolution_shell, self.box, cfg.angpix)
            bps = joined_at_low_resolution(bps, max(cfg.low_resol_join_halves, current), cfg.angpix)
        m = maximize_half_sets(
            bps,
            [float(s.class_weight.sum()) for s in sums],
            window_shell,
            cfg.tau2_fudge,
            0 if cfg.skip_gridding else GRIDDING_ITERATIONS,
            sch.final_iteration,
            settle=lambda: pause_point("mstep", self.iteration, self._writer.wait),
        )
        self.fsc, self.tau2 = m.fsc, m.tau2
        if sch.final_iteration:
            self.final_map, self.unfil = m.final_map, m.unfiltered
        else:
            assert m.references is not None
            self.maps = self._flattened(self._after_cc_iteration(m.references) if cc_iteration else m.references)
        # RELION's updateCurrentResolution keeps --ini_high for the iteration after the CC one
        res_shell = self._ini_shell() if cc_iteration else m.resolution_shell
        return {
            "resolution_shell": res_shell,
            "resolution_angst": shell_to_angstrom(res_shell, self.box, cfg.angpix),
            "fsc": m.fsc,
        }

    def _flattened(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """RELION's solventFlatten of the new references (not after the final iteration): the next E-step, the expected
        accuracy and the written maps see them masked."""
        cfg = self.cfg
        return [
            solvent_masked(m, cfg.particle_diameter, cfg.angpix, cfg.flatten_solvent, cfg.solvent_mask_volume)
            for m in maps
        ]

    def _after_cc_iteration(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """RELION, after the --firstiter_cc iteration: the new references are low-passed to --ini_high again."""
        return [low_pass_filter(m.double(), self.cfg.ini_high, self.cfg.angpix).to(m.dtype) for m in maps]

    # ------------------------------------------------------------------ outputs
    def _model_tables(self, info, record, model: int = 0) -> tuple:
        """model.star's tables of ``model`` (self.stats index: the half set − 1; in the final iteration the halves' pooled
        statistics, the same for both)."""
        cfg, stats = self.cfg, self.stats[model]
        rows = slice(None) if self.schedule.final_iteration else np.flatnonzero(self._model_of_particle() == model)
        n_sh = self.box // 2 + 1
        shells = np.arange(n_sh)
        res = np.where(shells > 0, shells / (self.box * cfg.angpix), 0.0)
        fsc = self.fsc.numpy()
        ssnr = fsc_to_ssnr(self.fsc).numpy()
        general = {
            "rlnReferenceDimensionality": 3,
            "rlnDataDimensionality": 2,
            "rlnOriginalImageSize": self.box,
            "rlnCurrentResolution": info["resolution_angst"],
            "rlnCurrentImageSize": 2 * record["window_shell"],
            "rlnPaddingFactor": cfg.pad,
            "rlnIsHelix": 0,
            "rlnFourierSpaceInterpolator": 1,
            "rlnMinRadiusNnInterpolation": 10,
            "rlnPixelSize": cfg.angpix,
            "rlnNrClasses": 1,
            "rlnNrBodies": 1,
            "rlnNrGroups": self.n_groups,
            "rlnTau2FudgeFactor": cfg.tau2_fudge,
            "rlnNormCorrectionAverage": float(np.mean(self.poses.norm_correction[rows])),
            "rlnSigmaOffsetsAngst": math.sqrt(stats.sigma2_offset_angst2),
            "rlnOrientationalPriorMode": int(self.schedule.local_search),
            "rlnSigmaPriorRotAngle": self.schedule.sigma_ang_deg,
            "rlnSigmaPriorTiltAngle": self.schedule.sigma_ang_deg,
            "rlnSigmaPriorPsiAngle": self.schedule.sigma_ang_deg,
            "rlnLogLikelihood": float(np.sum(self.poses.loglik)),
            "rlnAveragePmax": float(np.mean(self.poses.max_prob)),
        }
        classes = [
            {
                "rlnReferenceImage": f"{it_prefix(self.root, self.iteration)}_half1_class001.mrc",
                "rlnClassDistribution": 1.0,
                "rlnAccuracyRotations": record["accuracy_rotation_deg"],
                "rlnAccuracyTranslationsAngst": record["accuracy_offset_px"] * cfg.angpix,
                "rlnEstimatedResolution": info["resolution_angst"],
                "rlnOverallFourierCompleteness": 1.0,
            }
        ]
        tau2 = self.tau2[min(model, len(self.tau2) - 1)].numpy()
        class_table = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": res,
                "rlnAngstromResolution": np.where(res > 0, 1 / np.maximum(res, 1e-12), 999.0),
                "rlnSsnrMap": ssnr,
                "rlnGoldStandardFsc": fsc,
                "rlnFourierCompleteness": np.ones(n_sh),
                "rlnReferenceTau2": tau2[:n_sh],
            }
        )
        groups = pd.DataFrame(
            {
                "rlnGroupNumber": np.arange(1, self.n_groups + 1),
                "rlnGroupName": [g.name for g in self.table.optics],
                "rlnGroupNrParticles": np.bincount(self.table.optics_group, minlength=self.n_groups),
                "rlnGroupScaleCorrection": stats.scale.numpy(),
            }
        )
        sig = [
            pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": res, "rlnSigma2Noise": stats.sigma2[g].numpy()})
            for g in range(self.n_groups)
        ]
        return general, classes, [class_table], groups, sig

    def _data_columns(self) -> dict:
        p = self.poses
        return {
            "rlnAngleRot": p.rot_deg,
            "rlnAngleTilt": p.tilt_deg,
            "rlnAnglePsi": p.psi_deg,
            "rlnOriginXAngst": p.origin_x_angst,
            "rlnOriginYAngst": p.origin_y_angst,
            "rlnClassNumber": p.class_number,
            "rlnRandomSubset": self.halves,
            "rlnMaxValueProbDistribution": p.max_prob,
            "rlnNrOfSignificantSamples": p.n_significant,
            "rlnLogLikeliContribution": p.loglik,
            "rlnNormCorrection": p.norm_correction,
            "rlnGroupNumber": self.table.optics_group + 1,
        }

    def _write_sampling_star(self, pre: str) -> None:
        """run_itNNN_sampling.star of this iteration's sampling (both modes)."""
        cfg, sch = self.cfg, self.schedule
        write_sampling_star(
            f"{pre}_sampling.star",
            sch.healpix_order,
            angular_step_deg(sch.healpix_order),
            sch.offset_range_px * cfg.angpix,
            sch.offset_step_px * cfg.angpix,
            cfg.perturb,
            self.perturbation,
            cfg.sym,
            sch.local_search,
            sch.sigma_ang_deg,
        )

    def _write_iteration_files(self, info, record) -> None:
        cfg = self.cfg
        pre = it_prefix(self.root, self.iteration)
        for h in (1, 2):
            m = self.unfil[h - 1] if self.schedule.final_iteration else self.maps[h - 1]
            write_map(f"{pre}_half{h}_class001.mrc", m.cpu().numpy(), cfg.angpix)
            if self.schedule.final_iteration:
                write_map(f"{pre}_half{h}_class001_unfil.mrc", self.unfil[h - 1].numpy(), cfg.angpix)
            write_model_star(f"{pre}_half{h}_model.star", *self._model_tables(info, record, h - 1))
        write_particles(f"{pre}_data.star", self.table, **self._data_columns())
        self._write_sampling_star(pre)
        if self.schedule.final_iteration:
            write_map(f"{self.root}_class001.mrc", self.final_map.numpy(), cfg.angpix)
            for h in (1, 2):
                write_map(f"{self.root}_half{h}_class001_unfil.mrc", self.unfil[h - 1].numpy(), cfg.angpix)
            write_model_star(f"{self.root}_model.star", *self._model_tables(info, record))
            write_particles(f"{self.root}_data.star", self.table, **self._data_columns())
            write_angdist_bild(
                f"{self.root}_class001_angdist.bild",
                self.poses.rot_deg,
                self.poses.tilt_deg,
                cfg.particle_diameter / (2 * cfg.angpix),
                self.box // 2,
                cfg.angpix,
            )
        self._report(
            self.fsc.numpy(),
            (self.final_map if self.schedule.final_iteration else self.maps[0]).cpu().numpy(),
            force=self.schedule.final_iteration,
        )
        self._save_state(pre)  # last: an iteration with an optimiser.star has all its outputs

    def _report(self, fsc: np.ndarray, volume: np.ndarray, force: bool = False) -> None:
        """Refresh report.html (skipped where matplotlib is missing): at most every REPORT_INTERVAL_S unless ``force``
        (the last iteration). Its plots take ~1 s of the interpreter lock, which a GPU iteration of 2-3 s would wait
        on; a skipped refresh is kept and written when the run ends (_flush_report)."""
        try:
            from ..report import write_report
        except ImportError:
            return
        root, history, box, angpix, poses = Path(self.root), self.history, self.box, self.cfg.angpix, self.poses
        state = self._report_state
        state["pending"] = lambda: write_report(root.parent, str(root), history, fsc, box, angpix, poses, volume)
        if force or time.monotonic() - state["written"] >= REPORT_INTERVAL_S:
            self._flush_report()

    def _flush_report(self) -> None:
        state = self._report_state
        pending, state["pending"] = state["pending"], None
        if pending is not None:
            pending()
            state["written"] = time.monotonic()

    def _snapshot(self) -> "AutoRefine":
        """A copy of this engine for the background writer: what the next iteration changes in place (poses, table,
        schedule, history, random state) is copied, as are the maps (on their device: the writer thread brings them to
        the host, not the thread that drives the GPU); tensors that are replaced, not changed, are shared."""
        snap = copy.copy(self)
        snap.poses = ParticlePoses(**{k: v.copy() for k, v in self.poses.as_dict().items()})
        snap.table, snap.schedule = (
            self.table.subset(np.arange(len(self.table))),
            copy.deepcopy(self.schedule),
        )  # arrays copied
        snap.history, snap.rng = copy.deepcopy(self.history), copy.deepcopy(self.rng)
        snap.maps = [m.clone() for m in self.maps]
        return snap

    def write_iteration(self, info, record) -> None:
        """Rank 0's files of this iteration, written by the background writer from a snapshot (io/background.py):
        the next E-step runs meanwhile. optimiser.star still comes last."""
        self._writer.submit(self._snapshot()._write_iteration_files, copy.deepcopy(info), copy.deepcopy(record))

    # ------------------------------------------------------------------ state for --continue
    def _state(self) -> dict:
        """Everything the next iteration depends on (the maps on the compute device, other tensors on the CPU): saved for
        --continue, sent to the other ranks."""
        return {
            "iteration": self.iteration,
            "perturbation": self.perturbation,
            "maps": self.maps,
            "stats": self.stats,
            "schedule": asdict(self.schedule),
            "poses": self.poses.as_dict(),
            "halves": self.halves,
            "history": self.history,
            "fsc": self.fsc,
            "numpy_rng": self.rng.bit_generator.state,
            "direction_prior": self.direction_prior,
            "config": {k: v for k, v in asdict(self.cfg).items() if k != "solvent_mask_volume"},
            **self._extra_state(),
        }

    def _restore(self, s: dict) -> None:
        self.iteration, self.perturbation = s["iteration"], s["perturbation"]
        self.maps, self.stats = s["maps"], s["stats"]
        self.schedule = Schedule(**s["schedule"])
        self.poses = ParticlePoses(
            **{"residual_power": np.zeros(len(self.table)), **s["poses"]}
        )  # (older states lack it)
        self.halves, self.history, self.fsc, self.direction_prior = (
            s["halves"],
            s["history"],
            s["fsc"],
            s["direction_prior"],
        )
        self.rng.bit_generator.state = s["numpy_rng"]
        self._restore_extra_state(s)

    def _save_state(self, pre: str) -> None:
        from ..io.atomic import atomic_write

        state = self._state()
        files = self._map_files(pre)
        state["maps"] = saved_maps(files) if files is not None else [m.cpu() for m in state["maps"]]
        with atomic_write(f"{pre}_state.pt") as tmp:
            torch.save(state, tmp)
        write_star_table(
            f"{pre}_optimiser.star",
            {
                "optimiser_general": {
                    "rlnOutputRootName": self.root,
                    "rlnModelStarFile": f"{pre}_half1_model.star",
                    "rlnModelStarFile2": f"{pre}_half2_model.star",
                    "rlnExperimentalDataStarFile": f"{pre}_data.star",
                    "rlnOrientSamplingStarFile": f"{pre}_sampling.star",
                    "rlnCurrentIteration": self.iteration,
                    "rlnNumberOfIterations": self.cfg.max_iter,
                    "rlnDoSplitRandomHalves": 1,
                    "rlnJoinHalvesUntilThisResolution": self.cfg.low_resol_join_halves,
                    "rlnAdaptiveOversampleFraction": self.cfg.adaptive_fraction,
                    "rlnRandomSeed": self.cfg.random_seed,
                    "rlnParticleDiameter": self.cfg.particle_diameter,
                    "rlnDoAutoRefine": 1,
                    "rlnHasConverged": int(self.schedule.converged),
                    "rlnDoCorrectCtf": int(self.cfg.ctf),
                    "rlnDoZeroMask": int(self.cfg.zero_mask),
                    "rlnDoSolventFlattening": int(self.cfg.flatten_solvent),
                    "rlnSymmetryGroup": self.cfg.sym,
                    "rlnOptimiserStateFile": f"{pre}_state.pt",
                }
            },
        )

    def _load_state(self, optimiser_star: str) -> None:
        self._restore(read_state(optimiser_star))
        self.log.line(f"continuing after iteration {self.iteration} from {optimiser_star}")

    def _map_files(self, pre: str) -> list[str] | None:
        """The MRC files of this iteration that hold self.maps (None in the final iteration: its half maps are the
        unfiltered ones, so the state keeps the maps)."""
        return None if self.schedule.final_iteration else [f"{pre}_half{h}_class001.mrc" for h in (1, 2)]

    def _extra_state(self) -> dict:
        return {}

    def _describe(self) -> str:
        return f"sym {self.cfg.sym}"

    def _restore_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ driver
    def _out_of_time(self, t0: float, last_seconds: float | None) -> bool:
        """--max_seconds: would the next iteration end past the budget? Estimated by the last iteration's wall time
        (this call's, else the saved history's); with no estimate, one iteration runs.

        Under torchrun rank 0 decides (its clock; its iterations include the M-step and the files) and tells the
        others, so that every rank stops after the same iteration."""
        if self.cfg.max_seconds <= 0:  # the same on every rank (one command line)
            return False
        late = self._past_budget(t0, last_seconds) if self.dist.is_main else None
        return bool(broadcast_from_main(late, self.dist, "agreeing on --max_seconds with rank 0"))

    def _past_budget(self, t0: float, last_seconds: float | None) -> bool:
        if last_seconds is None:
            last_seconds = self.history[-1]["seconds"] if self.history else None
        if last_seconds is None:
            return False
        return time.perf_counter() - t0 + last_seconds > self.cfg.max_seconds

    def _stopped(self, t0: float) -> dict:
        resume = f"{it_prefix(self.root, self.iteration)}_optimiser.star"
        summary = {
            "stopped": True,
            "iterations": self.iteration,
            "seconds": time.perf_counter() - t0,
            "continue_from": resume,
        }
        self.log.line(
            f"stopping after iteration {self.iteration}: the next would end past --max_seconds {self.cfg.max_seconds:g}; "
            f"resume with --continue {resume}"
        )
        return summary

    def _ranks(self) -> str:
        d = self.dist
        return f", {d.world_size} ranks ({d.backend})" if d.grouped else ""

    def _iterate_until_done(self, t0: float) -> dict:
        """Iterate to convergence and the final joined iteration (or until --max_seconds); the run's summary."""
        cfg = self.cfg
        last = None
        while not self.schedule.final_iteration:
            if self._out_of_time(t0, last):
                return self._stopped(t0)
            self.schedule.check_convergence()  # RELION checks at the start of each iteration
            if self.iteration >= cfg.max_iter - 1:
                self.schedule.final_iteration = True
            t_it = time.perf_counter()
            with profiled(self.iteration + 1, self.schedule.final_iteration):
                self.iterate()
            last = time.perf_counter() - t_it
        return {
            "final_resolution_angst": self.history[-1]["resolution_angst"],
            "iterations": self.iteration,
            "output": f"{self.root}_class001.mrc",
        }

    def _resume_hint(self) -> str:
        root = Path(self.root)
        done = sorted(root.parent.glob(f"{root.name}_it*_optimiser.star"))
        return f"resume with --continue {done[-1]}" if done else "no iteration finished; start the run again"

    def run(self) -> dict:
        cfg = self.cfg
        self.log.line(
            f"cryorefine {self.command}: {len(self.table)} particles, box {self.box}, {cfg.angpix:.3f} Å/px, device {self.device}, "
            f"{self._describe()}{self._ranks()}, batches of {self._batch_size()}"
        )
        t0 = time.perf_counter()
        try:
            try:
                self._share_state()
                self._clock = time.perf_counter()
                summary = self._iterate_until_done(t0)
            finally:
                self._writer.close()  # every file of the last iteration is on disk before the run returns (or fails)
        except DistributedError as exc:  # also when torchrun's SIGTERM lands while the files are being finished
            try:
                self._writer.close()  # the hint names the last iteration whose files are complete
            except Exception:  # noqa: BLE001 - the distributed error is the one to report
                pass
            raise DistributedError(f"{exc}; {self._resume_hint()}") from exc
        self._flush_report()  # a refresh the interval held back (a run stopped by --max_seconds)
        summary["seconds"] = time.perf_counter() - t0
        if not summary.get("stopped"):  # a run stopped by --max_seconds has logged how to resume
            self.log.line("finished: " + json.dumps(summary))
        return summary
