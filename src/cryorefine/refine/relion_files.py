"""RELION's files of an iteration as functions of the run's context and state: model.star's tables, data.star's
columns, sampling.star and optimiser.star (with the checkpoint beside it).

What RELION 3.1's readers require (MlOptimiser::read, MlModel::read, HealpixSampling::read: a missing label stops
them), each in RELION's meaning and units, so that ``relion_refine --continue run_itNNN_optimiser.star`` and RELION's
Select read our iterations as their own. A value we have no equivalent of is RELION's default (said where written)."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from ..estep.images import MASK_EDGE_PX
from ..geometry.healpix import angular_step_deg
from ..io.outputs import it_prefix, write_sampling_star
from ..io.star import write_star_table
from ..mstep.noise import on_map_shells
from ..mstep.statistics import ModelStatistics
from .context import RunContext
from .state import RunState, save_checkpoint

RELION_NONE = "None"  # RELION's name for "no file" (a mask, a τ² spectrum)
NOT_ESTIMATED = 999.0  # RELION's accuracy and change before they are known


def relion_power(power, box: int) -> np.ndarray:
    """σ² or τ² (s,) in RELION's units: its transforms are normalised by 1/box² (2D images; its projections match),
    ours are not, so RELION's power spectra are ours / box⁴."""
    return np.asarray(power, dtype=np.float64) / float(box) ** 4


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
        "rlnNrGroups": len(ctx.groups.names),
        "rlnNrOpticsGroups": len(stats.sigma2),
        "rlnTau2FudgeFactor": cfg.tau2_fudge,
        "rlnNormCorrectionAverage": float(np.mean(p.norm_correction[rows])),
        "rlnSigmaOffsetsAngst": math.sqrt(stats.sigma2_offset_angst2),
        "rlnOrientationalPriorMode": int(sch.local_search),
        "rlnSigmaPriorRotAngle": sch.local_sigmas_deg[0],
        "rlnSigmaPriorTiltAngle": sch.local_sigmas_deg[1],
        "rlnSigmaPriorPsiAngle": sch.local_sigmas_deg[2],
        "rlnLogLikelihood": float(np.sum(p.loglik)),
        "rlnAveragePmax": float(np.mean(p.max_prob)),
    }


def class_table(ctx: RunContext, tau2, ssnr, completeness, fsc=None) -> pd.DataFrame:
    """model_class_N of one class (or half set), per shell: the SSNR^MAP (rlnSsnrMap, which sets the resolution), the
    half sets' FSC (classification has none: 0, as RELION's), the Fourier completeness and τ² in RELION's units.
    rlnReferenceSigma2 is 0: we keep no σ² of the reconstruction, and RELION's next M-step writes its own before
    anything reads it."""
    cols = shell_columns(ctx.box, ctx.angpix)
    res, n_sh = cols["rlnResolution"], ctx.box // 2 + 1
    fsc = np.zeros(n_sh) if fsc is None else fsc
    return pd.DataFrame(
        {
            **cols,
            "rlnAngstromResolution": np.where(res > 0, 1 / np.maximum(res, 1e-12), 999.0),
            "rlnSsnrMap": np.asarray(ssnr, dtype=np.float64)[:n_sh],
            "rlnGoldStandardFsc": np.asarray(fsc, dtype=np.float64)[:n_sh],
            "rlnFourierCompleteness": np.asarray(completeness, dtype=np.float64)[:n_sh],
            "rlnReferenceSigma2": np.zeros(n_sh),
            "rlnReferenceTau2": relion_power(tau2, ctx.box)[:n_sh],
        }
    )


def groups_table(ctx: RunContext, stats: ModelStatistics) -> pd.DataFrame:
    """model_groups: RELION's micrograph groups, each with the model's particles in it (a half set's in auto-refine, as
    RELION's nr_particles_per_group) and its intensity scale."""
    g = ctx.groups
    return pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, len(g.names) + 1),
            "rlnGroupName": g.names,
            "rlnGroupNrParticles": stats.scale.particles.numpy().astype(np.int64),
            "rlnGroupScaleCorrection": stats.scale.value.numpy(),
        }
    )


def noise_tables(ctx: RunContext, stats: ModelStatistics) -> dict[str, pd.DataFrame]:
    """The σ² tables in RELION's units (its next E-step scores the images with them): RELION 3.1's model_group_N, the
    σ² of each of its groups' optics group, and RELION 4/5's model_optics_group_N, one per optics group (the shells
    with σ² > 0, as it writes them; model_general's rlnNrOpticsGroups tells it to read these)."""
    cols = shell_columns(ctx.box, ctx.angpix)
    sigma2 = [
        on_map_shells(relion_power(s.numpy(), o.box), o.box, o.angpix, ctx.box, ctx.angpix)
        for s, o in zip(stats.sigma2, ctx.table.optics)
    ]
    # one table per optics group, shared by its micrograph groups (star_text formats a shared table once)
    per_optics = [pd.DataFrame({**cols, "rlnSigma2Noise": s2}) for s2 in sigma2]
    tables = {f"model_group_{n + 1}": per_optics[g] for n, g in enumerate(ctx.groups.optics)}
    for g, s2 in enumerate(sigma2):
        keep = s2 > 0
        tables[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {"rlnSpectralIndex": cols["rlnSpectralIndex"][keep], "rlnResolution": cols["rlnResolution"][keep],
             "rlnSigma2Noise": s2[keep]}
        )  # fmt: skip
    return tables


def direction_tables(prior) -> list[pd.DataFrame]:
    """model_pdf_orient_class_N: RELION's pdf_direction, one table per class (row of ``prior``, p(class, direction)
    over the iteration's HEALPix directions), which its next iteration reads as the prior of a global search."""
    rows = np.asarray(prior.cpu(), dtype=np.float64).reshape(-1, prior.shape[-1])
    return [pd.DataFrame({"rlnOrientationDistribution": row}) for row in rows]


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
        "rlnGroupNumber": ctx.groups.of_particle + 1,
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
    )


def _per_axis_angst(rms_2d_px: float, angpix: float) -> float:
    """RELION's change of offsets: the rms per axis in Å (ours: the rms 2D change in pixels); 999 stays 999."""
    return rms_2d_px if rms_2d_px >= NOT_ESTIMATED else rms_2d_px / math.sqrt(2) * angpix


def optimiser_general(ctx: RunContext, state: RunState) -> dict:
    """optimiser.star's table: every label RELION 3.1's MlOptimiser::read requires, as its MlOptimiser::write has
    them. Auto-refine points to the two half-set models (rlnModelStarFile2 only there: RELION's reader requires it
    exactly when the halves are split); classification to its one model.star. The schedule's counters, the last
    iteration's changes and accuracy in RELION's units (offsets in Å, per axis; best resolution in 1/Å)."""
    cfg, sch, angpix = ctx.cfg, state.schedule, ctx.angpix
    pre, halves = it_prefix(ctx.root, state.iteration), state.classes is None
    last = state.history[-1] if state.history else {}
    models = (
        {"rlnModelStarFile": f"{pre}_half1_model.star", "rlnModelStarFile2": f"{pre}_half2_model.star"}
        if halves
        else {"rlnModelStarFile": f"{pre}_model.star"}
    )
    best_angst = min((r["resolution_angst"] for r in state.history), default=NOT_ESTIMATED)
    return {
        "rlnOutputRootName": ctx.root,
        **models,
        "rlnExperimentalDataStarFile": f"{pre}_data.star",
        "rlnOrientSamplingStarFile": f"{pre}_sampling.star",
        "rlnCurrentIteration": state.iteration,
        "rlnNumberOfIterations": cfg.max_iter,
        "rlnDoSplitRandomHalves": int(halves),
        "rlnJoinHalvesUntilThisResolution": cfg.low_resol_join_halves if halves else -1.0,  # -1: RELION's "none"
        "rlnAdaptiveOversampleOrder": 1,  # ours is always RELION's default: 2× finer in the second pass
        "rlnAdaptiveOversampleFraction": cfg.adaptive_fraction,
        "rlnRandomSeed": cfg.random_seed,
        "rlnParticleDiameter": cfg.particle_diameter,
        "rlnWidthMaskEdge": int(MASK_EDGE_PX),
        "rlnDoZeroMask": int(cfg.zero_mask),
        "rlnDoSolventFlattening": int(cfg.flatten_solvent),
        "rlnSolventMaskName": cfg.solvent_mask or RELION_NONE,
        "rlnSolventMask2Name": RELION_NONE,
        "rlnTauSpectrumName": RELION_NONE,
        "rlnMaximumCoarseImageSize": -1,  # RELION's default: no cap on the coarse pass's size
        "rlnHighresLimitExpectation": cfg.strict_highres_exp if cfg.strict_highres_exp > 0 else -1.0,
        "rlnIncrementImageSize": sch.incr_size,
        "rlnDoMapEstimation": 1,
        "rlnDoAutoRefine": int(halves),
        "rlnAutoLocalSearchesHealpixOrder": cfg.auto_local_healpix_order,
        "rlnNumberOfIterWithoutResolutionGain": sch.iter_without_resolution_gain,
        "rlnBestResolutionThusFar": 1.0 / best_angst,
        "rlnNumberOfIterWithoutChangingAssignments": sch.iter_without_large_changes,
        "rlnDoSkipAlign": 0,
        "rlnOverallAccuracyRotations": last.get("accuracy_rotation_deg", NOT_ESTIMATED),
        "rlnOverallAccuracyTranslationsAngst": min(
            NOT_ESTIMATED, last.get("accuracy_offset_px", NOT_ESTIMATED) * angpix
        ),
        "rlnChangesOptimalOrientations": last.get("change_orientation_deg", NOT_ESTIMATED),
        "rlnChangesOptimalOffsets": _per_axis_angst(last.get("change_offset_px", NOT_ESTIMATED), angpix),
        "rlnChangesOptimalClasses": last.get("change_class_fraction", 0.0),  # one class: none change
        "rlnSmallestChangesOrientations": sch.smallest_change_orientation_deg,
        "rlnSmallestChangesOffsets": _per_axis_angst(sch.smallest_change_offset_px, angpix),
        "rlnSmallestChangesClasses": int(sch.smallest_change_classes),
        "rlnHasConverged": int(sch.converged),
        "rlnHasHighFscAtResolLimit": int(sch.has_high_fsc_at_limit),
        "rlnHasLargeSizeIncreaseIterationsAgo": 0,  # RELION's default (we keep no such counter)
        "rlnDoCorrectNorm": int(cfg.norm),
        "rlnDoCorrectScale": int(cfg.scale),
        "rlnDoCorrectCtf": int(cfg.ctf),
        "rlnDoIgnoreCtfUntilFirstPeak": int(cfg.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": int(cfg.ctf_phase_flipped),
        "rlnDoOnlyFlipCtfPhases": int(cfg.only_flip_phases),
        # RELION: after the first iteration the references are CTF-corrected (its E-step multiplies them by the CTF)
        "rlnRefsAreCtfCorrected": int(cfg.ctf),
        "rlnFixSigmaNoiseEstimates": 0,
        "rlnFixSigmaOffsetEstimates": 0,
        "rlnMaxNumberOfPooledParticles": 1,  # RELION's default --pool (its continuation sets it from --pool and --j)
    }


def saved_config(ctx: RunContext) -> dict:
    return asdict(ctx.cfg)


def write_checkpoint(ctx: RunContext, state: RunState, map_files: list[str] | None) -> None:
    """run_itNNN_state.pt and run_itNNN_optimiser.star (last: an iteration with an optimiser.star has all its
    outputs)."""
    pre = it_prefix(ctx.root, state.iteration)
    save_checkpoint(f"{pre}_state.pt", state, saved_config(ctx), map_files)
    write_star_table(f"{pre}_optimiser.star", {"optimiser_general": optimiser_general(ctx, state)})
