"""3D classification: K references on the same E-step engine (the class is one more dimension of the products).

RELION's scheme: K copies of the low-passed reference; in the first iteration (the second with --firstiter_cc)
each particle is held to a random class with a full pose search; then the E-step marginalises over classes and
poses; the M-step reconstructs each class with τ² from the power of the reference the E-step used (× --tau2_fudge),
and updates the class
priors, the direction priors, σ² and the offset prior. Fixed sampling (optionally local searches, --sigma_ang).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..estep.settings import EStepSettings
from ..estep.sums import WeightedSums
from ..io.mrc import write_map
from ..io.outputs import it_prefix, write_model_star
from ..io.particles import write_particles
from ..mstep.statistics import updated_statistics
from ..mstep.maximize import maximize_classes
from ..mstep.priors import class_prior, direction_log_prior, direction_prior
from ..mstep.tau2 import tau2_from_reference
from ..reconstruction.fsc import shell_to_angstrom
from ..reconstruction.reconstruct import GRIDDING_ITERATIONS
from ..reconstruction.symmetrise import symmetrise_backprojector
from ..parallel.context import Dist
from .auto_refine import AutoRefine, IterationPlan, RefineConfig
from .engine import ParticlePoses, prepare_references
from .progress import Progress
from .timing import profiled


MIN_CLASS_FOR_ACCURACY = 0.01  # RELION estimates the accuracy of classes holding at least this fraction


@dataclass
class ClassifyConfig(RefineConfig):
    K: int = 3
    tau2_fudge: float = 4.0
    max_iter: int = 25
    ini_high: float = 60.0


class Classify3D(AutoRefine):
    command = "classify"

    def __init__(self, cfg: ClassifyConfig, dist: Dist | None = None):
        super().__init__(cfg, dist)
        if cfg.K < 1:
            from ..errors import CryoInputError

            raise CryoInputError(f"--K must be at least 1 (got {cfg.K})")
        if not cfg.continue_from:
            self.maps = [self.maps[0].clone() for _ in range(cfg.K)]
            self.class_prior = torch.full((cfg.K,), 1.0 / cfg.K, dtype=torch.float64)
            self.direction_prior = None
            self.class_resolution = [shell for shell in [self.schedule.current_resolution_shell] * cfg.K]
            # RELION: the random class each particle is held to in the first iteration, drawn from its seed
            self.initial_class = np.random.default_rng(cfg.random_seed + 1).integers(0, cfg.K, len(self.table))

    def _fixed_volumes(self) -> dict:
        """K padded references and K back-projectors (no half sets to join)."""
        return {"references": self.cfg.K, "backprojectors": self.cfg.K, "join_halves": False}

    def _map_files(self, pre: str) -> list[str]:
        return [f"{pre}_class{k + 1:03d}.mrc" for k in range(self.cfg.K)]

    def _extra_state(self) -> dict:
        return {
            "class_prior": self.class_prior,
            "direction_prior": self.direction_prior,
            "class_resolution": self.class_resolution,
            "initial_class": self.initial_class,
        }

    def _restore_extra_state(self, s: dict) -> None:
        self.class_prior, self.direction_prior = s["class_prior"], s["direction_prior"]
        self.class_resolution, self.initial_class = s["class_resolution"], s["initial_class"]

    def _model_of_particle(self) -> np.ndarray:
        """One model for all particles."""
        return np.zeros(len(self.table), dtype=np.int64)

    def _window_shell(self) -> int:
        return min(self.box // 2, max(self.class_resolution) + self.cfg.incr_size)

    def _update_sampling(self, window_shell: int) -> None:
        """Fixed sampling (each class's accuracy is estimated after its M-step, _conclude)."""
        return None

    def _settings(self, sampling) -> EStepSettings:
        cfg, sch = self.cfg, self.schedule
        dir_prior = direction_log_prior(self.direction_prior, sampling.n_directions, sch.local_search)
        return EStepSettings(
            adaptive_fraction=cfg.adaptive_fraction,
            maxsig=cfg.maxsig,
            firstiter_cc=cfg.firstiter_cc and self.iteration == 1,
            local_sigma_deg=sch.sigma_ang_deg if sch.local_search else 0.0,
            sigma2_offset_angst2=self.stats[0].sigma2_offset_angst2,
            angpix=cfg.angpix,
            direction_log_prior=dir_prior,
            precision=cfg.precision,
        )

    def expectation(self, plan: IterationPlan) -> tuple[list[WeightedSums], dict]:
        """E-step of all particles against the K references (this rank's share), combined over ranks."""
        cfg = self.cfg
        random_class_iter = 2 if cfg.firstiter_cc else 1
        with self.timer("getFourierTransformsAndCTFs"):
            refs = prepare_references(self.maps, cfg.pad, self.device)
            # RELION takes each class's τ² for this iteration's reconstruction from the reference as prepared here
            self.class_tau2 = [tau2_from_reference(r, plan.window_shell) for r in refs]
        sums = WeightedSums.zeros(
            cfg.K, self.box, cfg.pad, self.n_groups, plan.sampling.n_directions, device=self.device
        )
        forced = self.initial_class if self.iteration <= random_class_iter else None
        avg_norm = self._average_norm_correction(np.arange(len(self.table))) if cfg.norm else None
        with Progress(len(self.table), f"iteration {self.iteration:3d}", self.dist.is_main) as bar:
            done = self._estep_pass(
                0,
                np.arange(len(self.table)),
                refs,
                plan,
                sums,
                self._progress(bar),
                forced_class=forced,
                avg_norm=avg_norm,
            )
        return [sums], self._combine([sums], done)

    def _conclude(
        self, plan: IterationPlan, sums: list[WeightedSums], previous: ParticlePoses, ranks: dict
    ) -> tuple[dict, dict]:
        sch = self.schedule
        with self.timer("M-step"):
            info = self.maximization(sums[0], plan.window_shell)
            # RELION: each class of at least 1 % against all particles; 999 for the others; overall the smallest.
            # From this iteration's maps and poses: RELION writes the same estimate into the next iteration's model.star
            rows = np.arange(len(self.table))
            acc = [
                self._expected_accuracy(plan.window_shell, m, rows)
                if float(p) >= MIN_CLASS_FOR_ACCURACY
                else (999.0, 999.0)
                for m, p in zip(self.maps, self.class_prior)
            ]
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
            "change_class_fraction": float(np.mean(previous.class_number != self.poses.class_number)),
            "mean_significant": float(np.mean(self.poses.n_significant)),
            "mean_max_prob": float(np.mean(self.poses.max_prob)),
            "accuracy_rotation_deg": min(a[0] for a in acc),
            "accuracy_offset_px": min(a[1] for a in acc),
            "class_accuracy": [list(a) for a in acc],
            "posterior_spread_deg": float(np.median(self.poses.angular_spread_deg)),
            "class_distribution": self.class_prior.tolist(),
            "class_resolution_angst": info["class_resolution_angst"],
            "sigma_offset_angst": math.sqrt(self.stats[0].sigma2_offset_angst2),
            **ranks,
            "seconds": time.perf_counter() - self._clock,
            "stages": self.timer.reset(),
            "final": False,
            "counters": self.timer.reset_counters(),
        }
        return record, info

    def maximization(self, sums: WeightedSums, window_shell: int) -> dict:
        cfg = self.cfg
        cc_iteration = cfg.firstiter_cc and self.iteration == 1
        self._update_norm_corrections()
        # RELION keeps the initial σ² after a cross-correlation iteration
        self.stats = [updated_statistics(self.stats[0], [sums], cfg.min_sigma2_offset, noise=not cc_iteration)]
        self.class_prior = class_prior(sums.class_weight.cpu())
        self.direction_prior = direction_prior(sums.direction_weight.cpu())
        for bp in sums.backprojectors:
            symmetrise_backprojector(bp, cfg.sym)
        new_maps, res_shells = maximize_classes(
            sums.backprojectors,
            sums.class_weight.tolist(),
            self.class_tau2,
            cfg.tau2_fudge,
            window_shell,
            0 if cfg.skip_gridding else GRIDDING_ITERATIONS,
        )
        self.maps = self._flattened(self._after_cc_iteration(new_maps) if cc_iteration else new_maps)
        # RELION keeps --ini_high as the resolution for the iteration after the CC one
        self.class_resolution = [self._ini_shell()] * cfg.K if cc_iteration else res_shells
        best = max(self.class_resolution)
        return {
            "resolution_shell": best,
            "resolution_angst": shell_to_angstrom(best, self.box, cfg.angpix),
            "class_resolution_angst": [shell_to_angstrom(s, self.box, cfg.angpix) for s in self.class_resolution],
        }

    def _write_iteration_files(self, info, record) -> None:
        cfg = self.cfg
        pre = it_prefix(self.root, self.iteration)
        for k, m in enumerate(self.maps):
            write_map(f"{pre}_class{k + 1:03d}.mrc", m.cpu().numpy(), cfg.angpix)
        general, _, _, groups, sig = self._model_tables(info, record)
        general.update({"rlnNrClasses": cfg.K, "rlnTau2FudgeFactor": cfg.tau2_fudge})
        classes = [
            {
                "rlnReferenceImage": f"{pre}_class{k + 1:03d}.mrc",
                "rlnClassDistribution": float(self.class_prior[k]),
                "rlnAccuracyRotations": record["class_accuracy"][k][0],
                "rlnAccuracyTranslationsAngst": min(999.0, record["class_accuracy"][k][1] * cfg.angpix),
                "rlnEstimatedResolution": info["class_resolution_angst"][k],
                "rlnOverallFourierCompleteness": 1.0,
            }
            for k in range(cfg.K)
        ]
        n_sh = self.box // 2 + 1
        shells = np.arange(n_sh)
        res = np.where(shells > 0, shells / (self.box * cfg.angpix), 0.0)
        tables = [
            pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": res, "rlnReferenceTau2": t.cpu().numpy()[:n_sh]})
            for t in self.class_tau2
        ]
        write_model_star(f"{pre}_model.star", general, classes, tables, groups, sig)
        cols = self._data_columns()
        cols.pop("rlnRandomSubset")
        write_particles(f"{pre}_data.star", self.table, **cols)
        self._write_sampling_star(pre)
        self._report(
            np.zeros(n_sh),
            self.maps[int(torch.argmax(self.class_prior))].cpu().numpy(),
            force=self.iteration >= cfg.max_iter,
        )
        self._save_state(pre)  # last: an iteration with an optimiser.star has all its outputs

    def _describe(self) -> str:
        return f"K={self.cfg.K}"

    def _iterate_until_done(self, t0: float) -> dict:
        last = None
        while self.iteration < self.cfg.max_iter:
            if self._out_of_time(t0, last):
                return self._stopped(t0)
            t_it = time.perf_counter()
            with profiled(self.iteration + 1):
                self.iterate()
            last = time.perf_counter() - t_it
        return {
            "iterations": self.iteration,
            "class_distribution": [round(float(x), 4) for x in self.class_prior],
            "class_resolution_angst": self.history[-1]["class_resolution_angst"],
        }
