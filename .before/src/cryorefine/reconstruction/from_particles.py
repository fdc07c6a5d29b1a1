"""Reconstruction of a map from particle images with known poses (what relion_reconstruct does).

Each image is transformed (phase origin at pixel d//2), re-centred by its origin offset (the
transform moved by +origin, RELION's rlnOriginX/Y convention), and back-projected as CTF·X with
weight CTF² (or X with weight 1 without CTF) under every symmetry-equivalent pose. RELION's
symmetry-equivalent pose of A is A·S (S in the point group, C_n on z, D_n's 2-fold on x): the 2D
pixel k lands at (A·S)ᵀk = Sᵀ·(Aᵀk), i.e. the slice is inserted once per operator of the group, which
is what RELION's BackProjector::symmetrise (summing the accumulators over R·k) amounts to. S·A
would instead turn the image in its own plane and is wrong (tests/relion shows both).

The division data/weight is RELION's (>= 4, without gridding iterations): no regulariser, each voxel's
weight floored at 1/1000 of its shell's mean weight so that voxels few slices reach (near CTF zeros,
under preferred orientation) do not blow up; then the corners outside the box's inscribed sphere are
set to their mean (reconstruction/reconstruct.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..ctf import ctf_for_particles
from ..optics import demodulation_factors, magnified
from ..errors import CryoInputError
from ..fourier.grids import rfft2_centered, rfft_freqs_2d
from ..fourier.shift import phase_shift_factors
from ..geometry.euler import euler_to_matrix
from ..geometry.symmetry import symmetry_matrices
from ..io.table import ParticleTable, read_images
from ..projection.insert import BackProjector
from ..validate import check_one_pixel_size
from .reconstruct import GRIDDING_ITERATIONS, reconstruct

MAX_INSERT_ELEMENTS = 1 << 21  # (rotations × pixels) per scatter-add call: bounds the (r, j, 8) temporaries


def expand_poses(rotations: torch.Tensor, sym_ops: torch.Tensor) -> torch.Tensor:
    """Symmetry-equivalent poses A·S, (n, 3, 3) × (G, 3, 3) -> (n·G, 3, 3), particle-major (RELION's convention)."""
    S = sym_ops.to(device=rotations.device, dtype=rotations.dtype)
    return (rotations.unsqueeze(1) @ S.unsqueeze(0)).reshape(-1, 3, 3)


def backproject_particles(
    table: ParticleTable,
    indices,
    bp: BackProjector,
    sym_ops: torch.Tensor,
    ctf: bool = True,
    batch: int = 256,
    max_shell: int | None = None,
) -> None:
    """Add the particles ``indices`` of ``table`` to ``bp`` (in place), each under its poses A·S for S in
    ``sym_ops``: their image frequencies up to ``max_shell`` pixels (default d/2)."""
    box = bp.box
    device, dtype = bp.weight.device, bp.weight.dtype
    ky2, kx2 = rfft_freqs_2d(box, device, dtype)
    inside = (ky2**2 + kx2**2 <= (box / 2 if max_shell is None else max_shell) ** 2).flatten()
    idx = torch.nonzero(inside).squeeze(1)  # (j,) rfft pixels inside the Nyquist circle
    ky, kx = ky2.flatten()[idx], kx2.flatten()[idx]
    angpix = table.angpix
    ops = sym_ops.to(device=device, dtype=dtype)
    n_ops = ops.shape[0]
    phase = demodulation_factors(table.optics, ky, kx, box) if ctf else None
    indices = np.asarray(indices, dtype=np.int64)
    # relion_reconstruct: each optics group's magnification always, its odd aberrations and premultiplied CTF with --ctf
    for g in np.unique(table.optics_group[indices]):
        optics = table.optics[int(g)]
        of_group = indices[table.optics_group[indices] == g]
        map_kx, map_ky = magnified(kx, ky, optics.mag)
        for start in range(0, len(of_group), batch):
            sel = of_group[start : start + batch]
            imgs = torch.from_numpy(read_images(table, sel)).to(device=device, dtype=dtype)
            f = rfft2_centered(imgs).flatten(-2)[:, idx]  # (n, j)
            origin_px = torch.as_tensor(
                np.stack([table.origin_x_angst[sel], table.origin_y_angst[sel]], -1) / angpix[sel, None],
                device=device,
                dtype=dtype,
            )
            f = f * phase_shift_factors(ky, kx, origin_px, box).to(f.dtype)  # re-centre: move by +origin
            if phase is not None:
                f = f * phase[int(g)].to(device=device, dtype=f.dtype)
            if ctf:
                c = ctf_for_particles(table, sel, ky, kx, box, device=device, dtype=dtype)  # (n, j)
                values, weights = (f if optics.ctf_premultiplied else f * c), c * c
            else:
                values, weights = f, torch.ones_like(f.real)
            A = euler_to_matrix(
                torch.as_tensor(table.rot_deg[sel], dtype=torch.float64),
                torch.as_tensor(table.tilt_deg[sel], dtype=torch.float64),
                torch.as_tensor(table.psi_deg[sel], dtype=torch.float64),
            ).to(device=device, dtype=dtype)
            A_sym = expand_poses(A, ops)  # (n·G, 3, 3)
            values = values.repeat_interleave(n_ops, 0)
            weights = weights.repeat_interleave(n_ops, 0)
            step = max(1, MAX_INSERT_ELEMENTS // max(1, len(idx)))
            for r0 in range(0, A_sym.shape[0], step):
                bp.insert(A_sym[r0 : r0 + step], map_ky, map_kx, values[r0 : r0 + step], weights[r0 : r0 + step])


def reconstruct_from_particles(
    table: ParticleTable,
    sym="C1",
    ctf: bool = True,
    pad: int = 2,
    batch: int = 256,
    device=None,
    subset: int | None = None,
    dtype=torch.float32,
    gridding_iterations: int = GRIDDING_ITERATIONS,
    max_shell: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(map (d, d, d) on ``device``, angpix) from the particles' images and poses.

    sym: point group name (RELION's axes) or a (G, 3, 3) tensor of operators. ctf: back-project
    CTF·X with weight CTF² (needs CTF columns). subset: 1 or 2 to use only that rlnRandomSubset
    half (None or other values: all particles). gridding_iterations: relion_reconstruct's --iter (0: --skip_gridding).
    max_shell: the last Fourier shell (pixels) back-projected and reconstructed (relion_reconstruct's --maxres as
    r_max = ⌈d·angpix / maxres⌉; default d/2).
    """
    if ctf and not table.has_ctf:
        raise CryoInputError(
            "the particles have no CTF columns (rlnDefocusU...); reconstruct without CTF correction",
            path=table.star_path,
        )
    box = table.box
    angpix = check_one_pixel_size(table)
    indices = np.arange(len(table))
    if subset in (1, 2):
        indices = np.flatnonzero(table.random_subset == subset)
        if len(indices) == 0:
            raise CryoInputError(f"no particles with rlnRandomSubset {subset}", path=table.star_path)
    ops = (
        symmetry_matrices(sym) if isinstance(sym, str) else torch.as_tensor(sym, dtype=torch.float64).reshape(-1, 3, 3)
    )
    bp = BackProjector.zeros(box, pad, device, dtype)
    if max_shell is not None:
        max_shell = min(max_shell, box // 2)
    backproject_particles(table, indices, bp, ops, ctf=ctf, batch=batch, max_shell=max_shell)
    vol = reconstruct(bp, max_shell=max_shell, gridding_iterations=gridding_iterations)
    return vol, angpix
