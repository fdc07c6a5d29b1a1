"""A cryoSPARC project made from a simulated particle set, its poses written in cryoSPARC's convention by an
independent path (scipy), so tests can check our .cs reading and conversion against the known RELION poses.

cryoSPARC convention (pyem's csparc2star): RELION's Euler matrix A is R(pose)ᵀ, and scipy's ZYZ intrinsic rotation
of (rot, tilt, psi) is Aᵀ (RELION's matrix is the passive Rz(psi)·Ry(tilt)·Rz(rot)), so
pose = Rotation.from_euler("ZYZ", (rot, tilt, psi)).as_rotvec(). Shifts: RELION's origin in pixels of
alignments3D/psize_A. Stacks: .mrc files under PROJECT/J7/extract, the .cs in PROJECT/J9.
"""

from pathlib import Path

import mrcfile
import numpy as np
import starfile
from scipy.spatial.transform import Rotation

ALIGN_PSIZE_FACTOR = 1.5  # alignments3D/psize_A / blob/psize_A: shifts must be scaled by the former


def write_cs(path, fields: dict) -> None:
    """Write a .cs file (numpy structured array, saved as .npy under the .cs name, as cryoSPARC does)."""
    n = len(next(iter(fields.values())))
    dtype = [(name, np.asarray(v).dtype, np.asarray(v).shape[1:]) for name, v in fields.items()]
    cs = np.zeros(n, dtype=dtype)
    for name, v in fields.items():
        cs[name] = v
    with open(path, "wb") as f:
        np.save(f, cs)


def read_simulation(sim_dir):
    """(particles DataFrame, optics row, images (n, box, box)) of `cryorefine simulate` output, read with
    starfile/mrcfile."""
    blocks = starfile.read(Path(sim_dir) / "particles.star", always_dict=True)
    with mrcfile.open(Path(sim_dir) / "particles.mrcs") as m:
        images = np.array(m.data)
    return blocks["particles"], blocks["optics"].iloc[0], images


def make_cs_project(sim_dir, project, exp_groups=(1, 3), n_stacks=2, seed=0, path_prefix="", object_paths=False):
    """Write PROJECT/J7/extract/stack_K.mrc and PROJECT/J9/J9_particles.cs from a simulation; particles are shuffled
    over the stacks and the rows. Returns (cs path, truth row of each .cs row)."""
    parts, optics, images = read_simulation(sim_dir)
    n, box, angpix = len(parts), images.shape[-1], float(optics["rlnImagePixelSize"])
    project = Path(project)
    (project / "J7" / "extract").mkdir(parents=True, exist_ok=True)
    (project / "J9").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # .cs row r describes truth particle order[r]
    stack_of_row = np.arange(n) % n_stacks
    idx_of_row = np.zeros(n, np.int64)
    for k in range(n_stacks):
        rows = np.flatnonzero(stack_of_row == k)
        idx_of_row[rows] = np.arange(len(rows))
        with mrcfile.new(project / "J7" / "extract" / f"stack_{k}.mrc") as m:  # a plain 3D .mrc, as cryoSPARC writes
            m.set_data(images[order[rows]].astype(np.float32))
            m.voxel_size = angpix
    t = parts.iloc[order].reset_index(drop=True)
    euler = np.stack([t["rlnAngleRot"], t["rlnAngleTilt"], t["rlnAnglePsi"]], 1)
    align_psize = angpix * ALIGN_PSIZE_FACTOR
    paths = [f"{path_prefix}J7/extract/stack_{k}.mrc".encode() for k in stack_of_row]
    fields = {
        "uid": np.arange(n, dtype=np.uint64) + 10**12,
        "blob/path": np.array(paths, dtype=object if object_paths else "S64"),
        "blob/idx": idx_of_row.astype(np.uint32),
        "blob/shape": np.tile(np.array([box, box], np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, angpix, np.float32),
        "blob/sign": np.full(n, -1.0, np.float32),
        "ctf/accel_kv": np.full(n, float(optics["rlnVoltage"]), np.float32),
        "ctf/cs_mm": np.full(n, float(optics["rlnSphericalAberration"]), np.float32),
        "ctf/amp_contrast": np.full(n, float(optics["rlnAmplitudeContrast"]), np.float32),
        "ctf/df1_A": t["rlnDefocusU"].to_numpy(np.float32),
        "ctf/df2_A": t["rlnDefocusV"].to_numpy(np.float32),
        "ctf/df_angle_rad": np.deg2rad(t["rlnDefocusAngle"].to_numpy()).astype(np.float32),
        "ctf/phase_shift_rad": np.zeros(n, np.float32),
        "ctf/exp_group_id": np.asarray(exp_groups, np.uint32)[np.arange(n) % len(exp_groups)],
        "alignments3D/pose": Rotation.from_euler("ZYZ", euler, degrees=True).as_rotvec().astype(np.float32),
        "alignments3D/shift": (np.stack([t["rlnOriginXAngst"], t["rlnOriginYAngst"]], 1) / align_psize).astype(
            np.float32
        ),
        "alignments3D/psize_A": np.full(n, align_psize, np.float32),
        "alignments3D/split": (t["rlnRandomSubset"].to_numpy() - 1).astype(np.uint32),
    }
    cs_path = project / "J9" / "J9_particles.cs"
    write_cs(cs_path, fields)
    return cs_path, order
