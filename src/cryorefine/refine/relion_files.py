"""RELION's files of an iteration as functions of the run's context and state: model.star's tables, data.star's
columns, sampling.star and optimiser.star (with the checkpoint beside it)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from ..geometry.healpix import angular_step_deg
from ..io.outputs import it_prefix, write_sampling_star
from ..io.star import write_star_table
from ..mstep.statistics import ModelStatistics
from .context import RunContext
from .state import RunState, save_checkpoint


def shell_columns(box: int, angpix: float) -> dict:
    shells = np.arange(box // 2 + 1)
    res = np.where(shells > 0, shells / (box * angpix), 0.0)
    return {"rlnSpectralIndex": shells, "rlnResolution": res}


def model_general(
    ctx: RunContext, state: RunState, stats: ModelStatistics, rows, resolution_angst: float, window_shell: int
) -> dict:
    """model.star's general table for the model of the particles ``rows`` with statistics ``stats``."""
    cfg, sch, p = ctx.cfg, state.schedule, state.poses
    return {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": ctx.box,
        "rlnCurrentResolution": resolution_angst,
        "rlnCurrentImageSize": 2 * window_shell,
        "rlnPaddingFactor": cfg.pad,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": cfg.angpix,
        "rlnNrClasses": 1 if state.classes is None else len(state.maps),
        "rlnNrBodies": 1,
        "rlnNrGroups": ctx.n_groups,
        "rlnTau2FudgeFactor": cfg.tau2_fudge,
        "rlnNormCorrectionAverage": float(np.mean(p.norm_correction[rows])),
        "rlnSigmaOffsetsAngst": math.sqrt(stats.sigma2_offset_angst2),
        "rlnOrientationalPriorMode": int(sch.local_search),
        "rlnSigmaPriorRotAngle": sch.sigma_ang_deg,
        "rlnSigmaPriorTiltAngle": sch.sigma_ang_deg,
        "rlnSigmaPriorPsiAngle": sch.sigma_ang_deg,
        "rlnLogLikelihood": float(np.sum(p.loglik)),
        "rlnAveragePmax": float(np.mean(p.max_prob)),
    }


def groups_table(ctx: RunContext, stats: ModelStatistics) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, ctx.n_groups + 1),
            "rlnGroupName": [g.name for g in ctx.table.optics],
            "rlnGroupNrParticles": np.bincount(ctx.table.optics_group, minlength=ctx.n_groups),
            "rlnGroupScaleCorrection": stats.scale.numpy(),
        }
    )


def noise_tables(ctx: RunContext, stats: ModelStatistics) -> list[pd.DataFrame]:
    cols = shell_columns(ctx.box, ctx.angpix)
    return [pd.DataFrame({**cols, "rlnSigma2Noise": stats.sigma2[g].numpy()}) for g in range(ctx.n_groups)]


def data_columns(ctx: RunContext, state: RunState, random_subset: bool) -> dict:
    """data.star's columns of the refined particles (rlnRandomSubset in auto-refine)."""
    p = state.poses
    cols = {
        "rlnAngleRot": p.rot_deg,
        "rlnAngleTilt": p.tilt_deg,
        "rlnAnglePsi": p.psi_deg,
        "rlnOriginXAngst": p.origin_x_angst,
        "rlnOriginYAngst": p.origin_y_angst,
        "rlnClassNumber": p.class_number,
        "rlnRandomSubset": state.halves,
        "rlnMaxValueProbDistribution": p.max_prob,
        "rlnNrOfSignificantSamples": p.n_significant,
        "rlnLogLikeliContribution": p.loglik,
        "rlnNormCorrection": p.norm_correction,
        "rlnGroupNumber": ctx.table.optics_group + 1,
    }
    if not random_subset:
        cols.pop("rlnRandomSubset")
    return cols


def write_sampling(ctx: RunContext, state: RunState, pre: str) -> None:
    """run_itNNN_sampling.star of this iteration's sampling."""
    cfg, sch = ctx.cfg, state.schedule
    write_sampling_star(
        f"{pre}_sampling.star",
        sch.healpix_order,
        angular_step_deg(sch.healpix_order),
        sch.offset_range_px * cfg.angpix,
        sch.offset_step_px * cfg.angpix,
        cfg.perturb,
        state.perturbation,
        cfg.sym,
        sch.local_search,
        sch.sigma_ang_deg,
    )


def saved_config(ctx: RunContext) -> dict:
    return asdict(ctx.cfg)


def write_checkpoint(ctx: RunContext, state: RunState, map_files: list[str] | None) -> None:
    """run_itNNN_state.pt and run_itNNN_optimiser.star (last: an iteration with an optimiser.star has all its
    outputs)."""
    cfg, pre = ctx.cfg, it_prefix(ctx.root, state.iteration)
    save_checkpoint(f"{pre}_state.pt", state, saved_config(ctx), map_files)
    write_star_table(
        f"{pre}_optimiser.star",
        {
            "optimiser_general": {
                "rlnOutputRootName": ctx.root,
                "rlnModelStarFile": f"{pre}_half1_model.star",
                "rlnModelStarFile2": f"{pre}_half2_model.star",
                "rlnExperimentalDataStarFile": f"{pre}_data.star",
                "rlnOrientSamplingStarFile": f"{pre}_sampling.star",
                "rlnCurrentIteration": state.iteration,
                "rlnNumberOfIterations": cfg.max_iter,
                "rlnDoSplitRandomHalves": 1,
                "rlnJoinHalvesUntilThisResolution": cfg.low_resol_join_halves,
                "rlnAdaptiveOversampleFraction": cfg.adaptive_fraction,
                "rlnRandomSeed": cfg.random_seed,
                "rlnParticleDiameter": cfg.particle_diameter,
                "rlnDoAutoRefine": 1,
                "rlnHasConverged": int(state.schedule.converged),
                "rlnDoCorrectCtf": int(cfg.ctf),
                "rlnDoZeroMask": int(cfg.zero_mask),
                "rlnDoSolventFlattening": int(cfg.flatten_solvent),
                "rlnSymmetryGroup": cfg.sym,
                "rlnOptimiserStateFile": f"{pre}_state.pt",
            }
        },
    )
