"""Simulate particles from an atomic model (PDB/mmCIF) or a map, with CTF, shifts and noise; the truth is kept.

Example: cryorefine simulate --model 6msm.pdb --o sim --n 2000 --box 96 --angpix 2.0 --snr 0.05
Writes DIR/particles.star (RELION 3.1, true poses), DIR/particles.mrcs and DIR/truth.mrc. Image names are relative to
the directory the command runs in (the RELION project directory), where RELION's programs look for them.

Given poses: cryorefine simulate --map truth.mrc --poses poses.star --o DIR --snr 0 --gpu
projects the map at the poses, CTFs and origin offsets of a STAR file (like relion_project --ang --ctf), streaming
the float32 stack to DIR/particles.mrcs; DIR/particles.star keeps the input columns (the truth) plus rlnImageName.
Box and pixel size come from the map (or, for an atomic model, from the STAR's optics table); no truth.mrc is written.
"""

from __future__ import annotations

import json

import torch

from ..density import atoms_to_map, packaged_model, read_atoms
from ..errors import CryoInputError


def add_args(p):
    p.add_argument(
        "--model",
        "--map",
        dest="model",
        default=None,
        help="atomic model (.pdb/.cif, optionally .gz/.bz2) or map (.mrc); default: the packaged 6msm model",
    )
    p.add_argument("--o", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of particles")
    p.add_argument("--box", type=int, default=96, help="box size (pixels)")
    p.add_argument("--angpix", type=float, default=2.0, help="pixel size (Å)")
    p.add_argument(
        "--snr",
        type=float,
        default=0.05,
        help="signal-to-noise ratio (clean-image variance / noise variance); 0 = no noise",
    )
    p.add_argument("--defocus_min", type=float, default=10000.0, help="smallest defocus (Å)")
    p.add_argument("--defocus_max", type=float, default=25000.0, help="largest defocus (Å)")
    p.add_argument("--astigmatism", type=float, default=300.0, help="largest |DefocusU - DefocusV| (Å)")
    p.add_argument("--max_shift", type=float, default=5.0, help="largest origin offset (Å)")
    p.add_argument("--bfactor", type=float, default=50.0, help="B-factor of the density from an atomic model (Å²)")
    p.add_argument("--no_ctf", action="store_true", help="no CTF (no defocus columns are written)")
    p.add_argument("--sym", default="C1", help="point group to impose on the truth map (C<n>, D<n>, T, O, I)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--gpu", action="store_true", help="project on the first CUDA device")
    p.add_argument(
        "--poses",
        default=None,
        help="STAR file of poses (RELION 3.0/3.1, e.g. make_bench_data.py's poses.star): project at these "
        "angles, origin offsets and CTFs instead of random ones "
        "(--n, --box, --angpix, defocus and shift options are then unused)",
    )
    p.add_argument("--batch", type=int, default=256, help="images projected per batch")
    p.add_argument("--voltage", type=float, default=300.0, help="acceleration voltage (kV)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration (mm)")
    p.add_argument(
        "--beam_tilt", type=float, nargs=2, default=(0.0, 0.0), metavar=("X", "Y"), help="beam tilt (mrad), x and y"
    )
    p.add_argument(
        "--mag_matrix",
        type=float,
        nargs=4,
        default=(1.0, 0.0, 0.0, 1.0),
        metavar=("M00", "M01", "M10", "M11"),
        help="anisotropic magnification matrix (RELION's rlnMagMat00 01 10 11)",
    )
    p.add_argument(
        "--odd_zernike", type=float, nargs="+", default=(), help="odd aberrations, RELION's rlnOddZernike coefficients"
    )
    p.add_argument(
        "--even_zernike",
        type=float,
        nargs="+",
        default=(),
        help="even aberrations, RELION's rlnEvenZernike coefficients",
    )


def truth_map(model, box: int, angpix: float, bfactor: float) -> torch.Tensor:
    from pathlib import Path

    from ..io.mrc import read_map

    path = packaged_model() if model is None else Path(model)
    if path.suffix == ".mrc" or path.suffix == ".map":
        data, map_angpix = read_map(path)
        if data.shape[0] != box:
            raise CryoInputError(
                f"map box {data.shape[0]} differs from --box {box}; resample it or pass --box {data.shape[0]}", path
            )
        if abs(map_angpix - angpix) > 1e-3 * angpix:
            raise CryoInputError(
                f"map pixel size {map_angpix:.4f} Å differs from --angpix {angpix}; pass --angpix {map_angpix:.4f}",
                path,
            )
        return torch.from_numpy(data).double()
    xyz, w = read_atoms(path)
    return atoms_to_map(xyz, w, box, angpix, bfactor)


def _main_poses(args):
    from pathlib import Path

    from ..io.mrc import read_map
    from ..simulate import project_poses

    if args.model is not None and Path(args.model).suffix in (".mrc", ".map"):
        data, angpix = read_map(args.model)
        vol = torch.from_numpy(data).double()
    else:
        from ..io.star import read_star

        optics = read_star(args.poses).get("optics")
        if optics is None or "rlnImageSize" not in optics or "rlnImagePixelSize" not in optics:
            raise CryoInputError(
                "with an atomic model, --poses needs an optics table with rlnImageSize and rlnImagePixelSize; "
                "or give a map with --map",
                args.poses,
            )
        box, angpix = int(optics["rlnImageSize"].iloc[0]), float(optics["rlnImagePixelSize"].iloc[0])
        vol = truth_map(args.model, box, angpix, args.bfactor)
    if args.sym.upper() != "C1":
        from ..reconstruction.symmetrise import symmetrise_map

        vol = symmetrise_map(vol, args.sym)
    if args.batch <= 0 or args.snr < 0:
        raise CryoInputError("--batch must be positive and --snr not negative")
    device = "cuda" if args.gpu else None
    summary = project_poses(
        vol,
        angpix,
        args.o,
        args.poses,
        snr=args.snr,
        seed=args.seed,
        batch=args.batch,
        device=device,
        ctf=not args.no_ctf,
    )
    print(json.dumps(summary))


def main(args):
    from ..reconstruction.symmetrise import symmetrise_map
    from ..simulate import simulate_particles

    if args.poses:
        if args.gpu and not torch.cuda.is_available():
            raise CryoInputError("--gpu given but no CUDA device is visible; drop --gpu to project on the CPU")
        return _main_poses(args)
    if args.n <= 0 or args.box <= 0 or args.angpix <= 0:
        raise CryoInputError("--n, --box and --angpix must be positive")
    vol = truth_map(args.model, args.box, args.angpix, args.bfactor)
    if args.sym.upper() != "C1":
        vol = symmetrise_map(vol, args.sym)
    device = "cuda" if args.gpu else None
    summary = simulate_particles(
        vol,
        args.angpix,
        args.o,
        args.n,
        snr=args.snr,
        defocus_min_angst=args.defocus_min,
        defocus_max_angst=args.defocus_max,
        astigmatism_angst=args.astigmatism,
        max_shift_angst=args.max_shift,
        seed=args.seed,
        device=device,
        ctf=not args.no_ctf,
        microscope=microscope_from_args(args),
    )
    print(json.dumps(summary))


def microscope_from_args(args):
    """The simulated scope: its voltage, Cs and aberrations (checked as the particle reader checks them)."""
    import numpy as np

    from ..io.particles import MAG_DETERMINANT, MAX_BEAM_TILT_MRAD
    from ..io.table import CS_RULE, VOLTAGE_RULE, plausible_cs, plausible_voltage
    from ..simulate import Microscope

    tilt, mag = tuple(args.beam_tilt), tuple(args.mag_matrix)
    if not plausible_voltage(np.float64(args.voltage)) or not plausible_cs(np.float64(args.cs)):
        raise CryoInputError(f"--voltage {VOLTAGE_RULE}; --cs {CS_RULE}")
    if max(abs(t) for t in tilt) > MAX_BEAM_TILT_MRAD:
        raise CryoInputError(f"--beam_tilt is in mrad: at most {MAX_BEAM_TILT_MRAD:g} either way")
    if not MAG_DETERMINANT[0] <= mag[0] * mag[3] - mag[1] * mag[2] <= MAG_DETERMINANT[1]:
        raise CryoInputError("--mag_matrix must be RELION's magnification matrix (determinant about 1)")
    return Microscope(args.voltage, args.cs, 0.1, tilt, tuple(args.odd_zernike), tuple(args.even_zernike), mag)
