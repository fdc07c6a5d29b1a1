"""RELION-named outputs of a run: run_it###_{data,model,optimiser,sampling}.star, maps, _angdist.bild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .star import write_star_table


def it_prefix(root: str, iteration: int) -> str:
    return f"{root}_it{iteration:03d}"


def write_model_star(
    path,
    general: dict,
    classes: list[dict],
    class_tables: list[pd.DataFrame],
    groups: pd.DataFrame,
    noise: dict[str, pd.DataFrame],
    directions: list[pd.DataFrame],
) -> None:
    """RELION model.star layout: model_general, model_classes, model_class_N, model_groups, the σ² tables ``noise``
    (RELION 3.1's model_group_N, RELION 4/5's model_optics_group_N), model_pdf_orient_class_N (RELION's reader of a 3D
    model requires each)."""
    blocks = {"model_general": general, "model_classes": pd.DataFrame(classes)}
    for k, t in enumerate(class_tables):
        blocks[f"model_class_{k + 1}"] = t
    blocks["model_groups"] = groups
    blocks.update(noise)
    for k, t in enumerate(directions):
        blocks[f"model_pdf_orient_class_{k + 1}"] = t
    write_star_table(path, blocks)


def write_sampling_star(
    path,
    healpix_order: int,
    psi_step: float,
    offset_range_angst: float,
    offset_step_angst: float,
    perturb: float,
    perturbation: float,
    sym: str,
) -> None:
    """sampling_general as RELION 3.1's HealpixSampling::write has it, with every label its reader requires (a 3D
    sampling of 2D offsets; no tilt limit: RELION's default -91)."""
    write_star_table(
        path,
        {
            "sampling_general": {
                "rlnIs3DSampling": 1,
                "rlnIs3DTranslationalSampling": 0,
                "rlnHealpixOrder": healpix_order,
                "rlnSymmetryGroup": sym,
                "rlnTiltAngleLimit": -91.0,
                "rlnPsiStep": psi_step,
                "rlnOffsetRange": offset_range_angst,
                "rlnOffsetStep": offset_step_angst,
                "rlnSamplingPerturbInstance": perturbation,
                "rlnSamplingPerturbFactor": perturb,
            }
        },
    )


def write_angdist_bild(
    path, rot_deg: np.ndarray, tilt_deg: np.ndarray, radius_px: float, offset_px: float, angpix: float
) -> None:
    """Angular distribution as ChimeraX BILD cylinders (length ∝ particle count per direction, RELION-style)."""
    from ..geometry.healpix import direction_vectors

    key = np.round(np.stack([rot_deg, tilt_deg], 1), 0)
    uniq, counts = np.unique(key, axis=0, return_counts=True)
    v = direction_vectors(uniq[:, 0], uniq[:, 1]).reshape(-1, 3)
    cmax = counts.max()
    lines = []
    for vec, c in zip(v, counts):
        frac = c / cmax
        lines.append(f".color {frac:.3f} 0 {1 - frac:.3f}\n")
        a = (radius_px * vec + offset_px) * angpix
        b = ((radius_px + 0.2 * radius_px * frac + 0.01) * vec + offset_px) * angpix
        lines.append(
            f".cylinder {a[0]:.2f} {a[1]:.2f} {a[2]:.2f} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {max(angpix, 0.5):.2f}\n"
        )
    from .atomic import atomic_write

    with atomic_write(path) as tmp:
        Path(tmp).write_text("".join(lines))
