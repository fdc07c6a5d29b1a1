"""Density maps from atomic models (gemmi reads PDB/mmCIF; splatting and the B-factor blur are ours)."""

from __future__ import annotations

import bz2
import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import CryoInputError
from .fourier.grids import irfft3_centered, rfft3_centered, rfft_freqs_3d

# electrons per element for the common biological elements (neutral atoms); others use gemmi's atomic number
_ELECTRONS = {"H": 1, "C": 6, "N": 7, "O": 8, "P": 15, "S": 16}


def packaged_model(name: str = "6msm.pdb.bz2") -> Path:
    return Path(str(resources.files("cryorefine") / "data" / name))


def read_atoms(path) -> tuple[np.ndarray, np.ndarray]:
    """Atom positions (m, 3) in Å as (x, y, z) and weights (electrons) from a PDB/mmCIF file (optionally .gz/.bz2)."""
    import gemmi

    path = Path(path)
    if not path.exists():
        raise CryoInputError("atomic model not found", path)
    try:
        if path.suffix == ".bz2":
            text = bz2.open(path, "rt").read()
            st = gemmi.read_pdb_string(text) if ".pdb" in path.name or ".ent" in path.name else gemmi.cif.read_string(text)
            if not isinstance(st, gemmi.Structure):
                st = gemmi.make_structure_from_block(st.sole_block())
        elif path.suffix == ".gz" or path.suffix in {".pdb", ".ent", ".cif", ".mmcif"}:
            st = gemmi.read_structure(str(path))
        else:
            raise CryoInputError("not an atomic model; expected .pdb, .cif or .mmcif (optionally .gz/.bz2)", path)
    except (RuntimeError, ValueError) as exc:
        raise CryoInputError(f"cannot read the atomic model ({exc})", path) from None
    st.remove_hydrogens()
    model = st[0]
    xyz, w = [], []
    for chain in model:
        for res in chain:
            for atom in res:
                xyz.append(atom.pos.tolist())
                w.append(_ELECTRONS.get(atom.element.name, atom.element.atomic_number))
    if not xyz:
        raise CryoInputError("the atomic model has no atoms", path)
    return np.asarray(xyz, dtype=np.float64), np.asarray(w, dtype=np.float64)


def atoms_to_map(xyz_angst: np.ndarray, weights: np.ndarray, box: int, angpix: float, bfactor: float = 50.0, centre: bool = True) -> torch.Tensor:
    """(d, d, d) map (z, y, x) of atoms blurred by a Gaussian B-factor (Å²); the model's centroid at voxel d//2.

    Atoms are splatted trilinearly; the splat's sinc² transfer is divided out in Fourier space.
    """
    pos = torch.as_tensor(xyz_angst, dtype=torch.float64)
    if centre:
        pos = pos - pos.mean(0)
    vox = pos / angpix + box // 2  # (m, 3) as (x, y, z)
    w = torch.as_tensor(weights, dtype=torch.float64)
    grid = torch.zeros(box**3, dtype=torch.float64)
    v0 = torch.floor(vox).long()
    frac = vox - v0
    for corner in range(8):
        d = torch.tensor([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1])
        idx = v0 + d
        cw = torch.prod(torch.where(d.bool(), frac, 1 - frac), dim=1) * w
        ok = ((idx >= 0) & (idx < box)).all(1)
        flat = (idx[ok, 2] * box + idx[ok, 1]) * box + idx[ok, 0]
        grid.index_add_(0, flat, cw[ok])
    f = rfft3_centered(grid.reshape(box, box, box))
    kz, ky, kx = rfft_freqs_3d(box, dtype=torch.float64)
    splat = (torch.sinc(kx / box) * torch.sinc(ky / box) * torch.sinc(kz / box)) ** 2
    s2 = (kx**2 + ky**2 + kz**2) / (box * angpix) ** 2
    f = f * torch.exp(-bfactor * s2 / 4.0) / splat
    return irfft3_centered(f, box)


def model_radius_angst(xyz_angst: np.ndarray) -> float:
    return float(np.linalg.norm(xyz_angst - xyz_angst.mean(0), axis=1).max())
