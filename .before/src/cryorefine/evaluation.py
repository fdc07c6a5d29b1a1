"""Errors of a refinement against the truth: per-particle pose errors and the map's FSC to the true map.

Particles are matched by rlnImageName (exactly, or by image number and stack file name when the
stack paths are written differently). The angular error is the angle of the rotation between the
refined and the true pose, minimised over symmetry-equivalent poses A·S (RELION's convention); the
shift error is the distance between the origin offsets in Å.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CryoInputError
from .geometry.euler import angular_distance_deg, euler_to_matrix
from .geometry.symmetry import symmetry_matrices
from .reconstruction.fsc import fsc_curve, resolution_angstrom


@dataclass(frozen=True)
class Poses:
    """Per-particle poses read from a STAR file, without touching the image stacks."""

    image_name: np.ndarray  # object: rlnImageName strings
    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    origin_x_angst: np.ndarray
    origin_y_angst: np.ndarray

    def __len__(self) -> int:
        return len(self.image_name)


def read_poses(star_path) -> Poses:
    """Poses of a RELION 3.0/3.1 particle STAR file (origins in Å; 3.0 pixel origins converted)."""
    from .io.particles import numeric_column, origins_angst, particle_pixel_sizes, particles_block
    from .io.star import read_star

    star_path = Path(star_path)
    if not star_path.is_file():
        raise CryoInputError("STAR file not found", path=star_path)
    blocks = read_star(star_path)
    block, df = particles_block(blocks, star_path)
    if "rlnImageName" not in df.columns:
        raise CryoInputError(
            f"missing column rlnImageName in data_{block}; particles are matched by it", path=star_path
        )
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        if column not in df.columns:
            raise CryoInputError(f"missing column {column} in data_{block}; poses are needed", path=star_path)

    def col(name):
        return numeric_column(df, name, block, star_path)

    ox, oy = origins_angst(df, lambda: particle_pixel_sizes(blocks, block, df, star_path), block, star_path)
    return Poses(
        df["rlnImageName"].astype(str).to_numpy(object),
        col("rlnAngleRot"),
        col("rlnAngleTilt"),
        col("rlnAnglePsi"),
        ox,
        oy,
    )


def _loose_key(name: str) -> str:
    """'000012@Extract/job1/a.mrcs' -> '12@a.mrcs' (image number without zero padding, stack file name)."""
    index, at, stack = str(name).partition("@")
    if not at:
        return f"1@{os.path.basename(index)}"
    try:
        index = str(int(index))
    except ValueError:
        pass
    return f"{index}@{os.path.basename(stack)}"


def match_particles(data, truth) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (i_data, i_truth) of the particles present in both, matched by rlnImageName.

    Exact names first; if none match, image number + stack file name (paths may differ between runs).
    Raises CryoInputError when nothing matches or a name repeats.
    """
    for key in (str, _loose_key):
        d_names = [key(n) for n in data.image_name]
        t_names = [key(n) for n in truth.image_name]
        t_index = {n: i for i, n in enumerate(t_names)}
        if len(t_index) != len(t_names):
            raise CryoInputError("the truth STAR file repeats an rlnImageName; particles cannot be matched")
        pairs = [(i, t_index[n]) for i, n in enumerate(d_names) if n in t_index]
        if pairs:
            if len({n for n in d_names}) != len(d_names):
                raise CryoInputError("the data STAR file repeats an rlnImageName; particles cannot be matched")
            a = np.array(pairs, dtype=np.int64)
            return a[:, 0], a[:, 1]
    raise CryoInputError("no particle of the data STAR file matches the truth by rlnImageName")


def pose_errors(data, truth, sym: str = "C1") -> dict:
    """Per matched particle: angular error (deg, symmetry-aware) and shift error (Å).

    ``data`` and ``truth``: ParticleTable or Poses (anything with image_name, rot/tilt/psi_deg,
    origin_x/y_angst). Returns {'data_index', 'truth_index', 'angle_deg', 'shift_angst'} (arrays).
    """
    i_d, i_t = match_particles(data, truth)

    def matrices(p, i):
        return euler_to_matrix(
            torch.as_tensor(np.asarray(p.rot_deg)[i]),
            torch.as_tensor(np.asarray(p.tilt_deg)[i]),
            torch.as_tensor(np.asarray(p.psi_deg)[i]),
        )

    S = symmetry_matrices(sym)
    angle = angular_distance_deg(matrices(data, i_d), matrices(truth, i_t), S if len(S) > 1 else None).numpy()
    dx = np.asarray(data.origin_x_angst)[i_d] - np.asarray(truth.origin_x_angst)[i_t]
    dy = np.asarray(data.origin_y_angst)[i_d] - np.asarray(truth.origin_y_angst)[i_t]
    return {"data_index": i_d, "truth_index": i_t, "angle_deg": angle, "shift_angst": np.hypot(dx, dy)}


def summarise_pose_errors(errors: dict) -> dict:
    """Median and 90th percentile of the angular (deg) and shift (Å) errors, and the particle count."""
    a, s = errors["angle_deg"], errors["shift_angst"]
    return {
        "n_matched": int(len(a)),
        "angle_median_deg": float(np.median(a)),
        "angle_p90_deg": float(np.percentile(a, 90)),
        "shift_median_angst": float(np.median(s)),
        "shift_p90_angst": float(np.percentile(s, 90)),
    }


def map_resolution(map1: torch.Tensor, map2: torch.Tensor, angpix: float, thresholds=(0.5, 0.143)) -> dict:
    """FSC curve between two maps of one box and the resolution (Å) where it first drops below each threshold.

    Returns {'fsc': (d//2+1,) tensor, 'resolution_angst': {threshold: Å}} (inf if shell 1 is already below).
    """
    if map1.shape != map2.shape:
        raise CryoInputError(f"maps differ in size: {tuple(map1.shape)} vs {tuple(map2.shape)}")
    f = fsc_curve(map1, map2)
    box = map1.shape[-1]
    return {"fsc": f, "resolution_angst": {t: resolution_angstrom(f, t, box, angpix) for t in thresholds}}
