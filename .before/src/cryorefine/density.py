"""Density maps from atomic models (gemmi reads PDB/mmCIF; splatting and the B-factor blur are ours)."""

from __future__ import annotations

import bz2
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
            st = (
                gemmi.read_pdb_string(text)
                if ".pdb" in path.name or ".ent" in path.name
                else gemmi.cif.read_string(text)
            )
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


def atoms_to_map(
    xyz_angst: np.ndarray, weights: np.ndarray, box: int, angpix: float, bfactor: float = 50.0, centre: bool = True
) -> torch.Tensor:
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


def two_fold_axis_to_z(path, chain_a: str = "A", chain_b: str = "B") -> tuple[np.ndarray, np.ndarray]:
    """Atoms (x, y, z) Å and weights of chains ``chain_a`` + ``chain_b`` of a C2 dimer, turned so its 2-fold is z.

    The 2-fold is the rotation that superposes chain A's Cα atoms onto chain B's (Kabsch on residues
    present in both); the model is moved so that axis passes through the origin, the atoms' mean z
    being 0. Map it with ``atoms_to_map(..., centre=False)``: re-centring on the centroid would move
    the axis off the centre voxel when the chains hold different atom counts.
    """
    import gemmi

    path = Path(path)
    st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    model = st[0]
    try:
        ca = {
            name: {
                res.seqid.num: np.array(res["CA"][0].pos.tolist())
                for res in model[name]
                if res.find_atom("CA", "*") and res.seqid.num is not None
            }
            for name in (chain_a, chain_b)
        }
    except (KeyError, IndexError, RuntimeError):
        raise CryoInputError(f"chains {chain_a} and {chain_b} with Cα atoms are needed", path) from None
    common = sorted(set(ca[chain_a]) & set(ca[chain_b]))
    if len(common) < 3:
        raise CryoInputError(f"chains {chain_a} and {chain_b} share fewer than 3 residues", path)
    P = np.stack([ca[chain_a][k] for k in common])
    Q = np.stack([ca[chain_b][k] for k in common])
    pc, qc = P.mean(0), Q.mean(0)
    U, _, Vt = np.linalg.svd((P - pc).T @ (Q - qc))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T  # Q ≈ R P + t
    t = qc - R @ pc
    w_, v_ = np.linalg.eig(R)
    axis = np.real(v_[:, np.argmin(np.abs(w_ - 1))])
    axis /= np.linalg.norm(axis)
    point = np.linalg.lstsq(np.eye(3) - R, t - axis * (axis @ t), rcond=None)[0]  # a point on the axis
    # frame with the axis as its third row: x' = F (x - point)
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    F = np.stack([e1, np.cross(axis, e1), axis])
    xyz, w = [], []
    for name in (chain_a, chain_b):
        for res in model[name]:
            for atom in res:
                xyz.append(atom.pos.tolist())
                w.append(_ELECTRONS.get(atom.element.name, atom.element.atomic_number))
    xyz = (np.asarray(xyz) - point) @ F.T
    xyz[:, 2] -= xyz[:, 2].mean()
    return xyz, np.asarray(w, dtype=np.float64)


def fourier_binned(volume: torch.Tensor, box: int) -> torch.Tensor:
    """(box, box, box) a (B, B, B) map of mass per voxel resampled to ``box`` voxels of the same extent by cropping its
    Fourier transform (band-limited, as super-resolution data are binned); still mass per voxel."""
    big, h = volume.shape[-1], box // 2
    lo = big // 2 - h
    f = torch.fft.fftshift(torch.fft.fftn(volume.double()))[lo : lo + box, lo : lo + box, lo : lo + box]
    return torch.fft.ifftn(torch.fft.ifftshift(f)).real


def band_limited_map(
    xyz_angst: np.ndarray, weights: np.ndarray, box: int, angpix: float, bfactor: float, supersample: int = 2
) -> torch.Tensor:
    """atoms_to_map made at 1/``supersample`` of the pixel size and binned (fourier_binned): the blobs of a B-factor
    of ~50 Å² still have power at a coarse Nyquist, which a map splatted there aliases, so maps of one model at two
    pixel sizes would differ near the coarser one's Nyquist; binned, both sample one band-limited object."""
    fine = atoms_to_map(xyz_angst, weights, box * supersample, angpix / supersample, bfactor)
    return fourier_binned(fine, box)
