"""Simulate particles from an atomic model (PDB/mmCIF) or a map, with CTF, shifts and noise; the truth is kept.

Example: cryorefine simulate --model 6msm.pdb --o sim --n 2000 --box 96 --angpix 2.0 --snr 0.05
Writes DIR/particles.star (RELION 3.1, true poses), DIR/particles.mrcs and DIR/truth.mrc. Image names are relative to
the directory the command runs in (the RELION project directory), where RELION's programs look for them.

Given poses: cryorefine simulate --map truth.mrc --poses poses.star --o DIR --snr 0 --gpu
projects the map at the poses, CTFs and origin offsets of a STAR file (like relion_project --ang --ctf), streaming
the float32 stack to DIR/particles.mrcs; DIR/particles.star keeps the input columns (the truth) plus rlnImageName.
Box and pixel size come from the map (or, for an atomic model, from the STAR's optics table); no truth.mrc is written.

What real data has (each off by default): --micrographs (rlnMicrographName, defocus and signal scale per micrograph,
the truth in DIR/micrographs_truth.star), --model_noise (coloured noise from a RELION model.star, as relion_project
--model_noise), --junk/--junk_map (junk particles, rlnClassNumber 2 in DIR/particles.star only), --preferred_view
(views concentrated about z) and --optics (optics groups of different pixel sizes and boxes, one stack each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    p.add_argument(
        "--astigmatism", type=float, default=300.0, help="astigmatism: DefocusU - DefocusV uniform in ± half this (Å)"
    )
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
    add_real_data_args(p)


def add_real_data_args(p):
    """What real data has beyond one perfect micrograph: micrographs, coloured noise, junk, preferred views, optics
    groups. Every one is off by default (the set is then as without these options)."""
    p.add_argument(
        "--micrographs",
        type=int,
        default=None,
        metavar="M",
        help="divide the particles among M micrographs (contiguous runs): rlnMicrographName, a defocus (within "
        "--defocus_min/--defocus_max, with its astigmatism and angle) and a signal scale (--mic_scale) per micrograph; "
        "particles_noposes.star has the micrograph's defocus, particles.star each particle's; the truth per "
        "micrograph in micrographs_truth.star",
    )
    p.add_argument(
        "--defocus_spread",
        type=float,
        default=None,
        help="with --micrographs: each particle's defocus about its micrograph's, a Gaussian of this sd (Å); 50 if "
        "not given",
    )
    p.add_argument(
        "--mic_scale",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("MIN", "MAX"),
        help="with --micrographs: each micrograph's signal (not its noise) multiplied by a scale drawn uniformly in "
        "[MIN, MAX], the ratio RELION's --scale estimates (rlnGroupScaleCorrection; its truth in "
        "micrographs_truth.star)",
    )
    p.add_argument(
        "--model_noise",
        default=None,
        metavar="MODEL_STAR",
        help="coloured Gaussian noise with the σ² spectra of a RELION 3.1 model.star (data_model_group_N, as "
        "relion_project --model_noise; remapped to this box and pixel size as RELION's refinement does; micrograph m "
        "takes group m mod groups) instead of white noise; the signal is scaled to --snr against it",
    )
    p.add_argument(
        "--junk",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="replace this fraction of the particles by junk: pure noise, or projections of --junk_map; "
        "rlnClassNumber 2 in particles.star (1: a particle), not in particles_noposes.star",
    )
    p.add_argument(
        "--junk_map",
        default=None,
        help="with --junk: the junk is projections of this map (.mrc, at the set's box and pixel size) or atomic "
        "model, scaled to the truth map's power, at the particle's pose, CTF and offset",
    )
    p.add_argument(
        "--preferred_view",
        type=float,
        default=None,
        metavar="KAPPA",
        help="concentrate the views: projection directions from a von Mises-Fisher distribution of concentration "
        "KAPPA about the z axis (density exp(KAPPA cos tilt); for a large KAPPA tilts of about sqrt(2/KAPPA) rad rms)",
    )
    p.add_argument(
        "--uniform_fraction",
        type=float,
        default=0.0,
        help="with --preferred_view: this fraction of the directions uniform instead",
    )
    p.add_argument(
        "--optics",
        default=None,
        metavar="ANGPIX:BOX,...",
        help="several optics groups, each PIXEL_SIZE:BOX (Å : pixels), e.g. 1.20:128,1.25:120 (replaces --angpix "
        "and --box): the particles (whole micrographs) divided evenly, each group's images projected from a truth "
        "built at its own sampling (needs an atomic model) in a stack of their own; truth.mrc is the first group's",
    )


def truth_map(model, box: int, angpix: float, bfactor: float) -> torch.Tensor:
    from ..io.mrc import read_map

    path = packaged_model() if model is None else Path(model)
    if _is_map(path):
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
    from ..io.mrc import read_map
    from ..simulate import project_poses

    if _is_map(args.model):
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
    vol = _symmetrised(vol, args.sym)
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
    from ..simulate import simulate_particles

    if args.poses:
        given = given_real_data_options(args)
        if given:
            raise CryoInputError(
                f"{given[0]} does not apply to --poses (its poses, CTFs and optics are given); drop it"
            )
        if args.gpu and not torch.cuda.is_available():
            raise CryoInputError("--gpu given but no CUDA device is visible; drop --gpu to project on the CPU")
        return _main_poses(args)
    if args.n <= 0 or args.box <= 0 or args.angpix <= 0:
        raise CryoInputError("--n, --box and --angpix must be positive")
    groups = parse_optics(args.optics) if args.optics else [(args.angpix, args.box)]
    if args.n < len(groups):
        raise CryoInputError(f"--n {args.n} is fewer than the {len(groups)} optics groups of --optics; ask for more")
    micrographs, noise_model = micrographs_from_args(args, len(groups)), noise_model_from_args(args)
    view, junk = preferred_view_from_args(args), junk_from_args(args, groups)
    vols = [_symmetrised(v, args.sym) for v in group_maps(args.model, groups, args.bfactor, "--model")]
    device = "cuda" if args.gpu else None
    summary = simulate_particles(
        vols[0],
        groups[0][0],
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
        micrographs=micrographs,
        noise_model=noise_model,
        junk=junk,
        preferred_view=view,
        more_groups=[(v, pix) for v, (pix, _) in zip(vols[1:], groups[1:])],
    )
    print(json.dumps(summary))


def _symmetrised(vol: torch.Tensor, sym: str) -> torch.Tensor:
    from ..reconstruction.symmetrise import symmetrise_map

    return vol if sym.upper() == "C1" else symmetrise_map(vol, sym)


def given_real_data_options(args) -> list[str]:
    """The real-data options (``add_real_data_args``) given other than at their defaults."""
    defaults = {"micrographs": None, "defocus_spread": None, "mic_scale": (1.0, 1.0), "model_noise": None, "junk": 0.0,
                "junk_map": None, "preferred_view": None, "uniform_fraction": 0.0, "optics": None}  # fmt: skip
    given = []
    for name, default in defaults.items():
        value = getattr(args, name)
        if (tuple(value) if isinstance(value, list) else value) != default:
            given.append(f"--{name}")
    return given


def parse_optics(text: str) -> list[tuple[float, int]]:
    """--optics "1.20:128,1.25:120" -> [(pixel size Å, box px), ...]."""
    groups = []
    for item in text.split(","):
        angpix, _, box = item.strip().partition(":")
        try:
            groups.append((float(angpix), int(box)))
        except ValueError:
            raise CryoInputError(
                f"--optics {text!r}: give each optics group as PIXEL_SIZE:BOX (Å : pixels), comma-separated, e.g. "
                "1.20:128,1.25:120"
            ) from None
    if any(not (math.isfinite(a) and a > 0) or b <= 0 for a, b in groups):
        raise CryoInputError(f"--optics {text!r}: every pixel size (Å) and box (pixels) must be positive")
    return groups


def _is_map(path) -> bool:
    return path is not None and Path(path).suffix in (".mrc", ".map")


def group_maps(model, groups: list[tuple[float, int]], bfactor: float, flag: str) -> list[torch.Tensor]:
    """The map of ``model`` for each optics group (pixel size Å, box px): an atomic model's density built at each
    group's sampling; a map only where every group has its pixel size and box (resampling it would be the very
    rescaling a refinement of mixed optics groups is to be tested on)."""
    if _is_map(model) and len(set(groups)) > 1:
        raise CryoInputError(
            f"{flag} is a map, of one pixel size and box: optics groups of several (--optics) need an atomic model "
            "(.pdb/.cif), whose density is built at each group's own sampling",
            model,
        )
    return [truth_map(model, box, angpix, bfactor) for angpix, box in groups]


def micrographs_from_args(args, n_groups: int):
    """--micrographs, --defocus_spread and --mic_scale as ``Micrographs`` (None without --micrographs)."""
    from ..simulate import Micrographs

    lo, hi = args.mic_scale
    if args.micrographs is None:
        if args.defocus_spread is not None or (lo, hi) != (1.0, 1.0):
            raise CryoInputError("--defocus_spread and --mic_scale are per micrograph: give --micrographs M too")
        return None
    if not max(n_groups, 1) <= args.micrographs <= args.n:
        raise CryoInputError(
            f"--micrographs must be between the number of optics groups ({n_groups}) and --n ({args.n})"
        )
    spread = 50.0 if args.defocus_spread is None else args.defocus_spread
    if not (math.isfinite(spread) and spread >= 0):
        raise CryoInputError("--defocus_spread is a standard deviation (Å): give a value >= 0")
    if not (math.isfinite(hi) and 0 < lo <= hi):
        raise CryoInputError("--mic_scale MIN MAX: give 0 < MIN <= MAX (1 1: no scale)")
    return Micrographs(args.micrographs, spread, (lo, hi))


def noise_model_from_args(args):
    """--model_noise's spectra (None without it); they need --snr > 0 to set the signal's scale against them."""
    from ..simulate import read_noise_model

    if args.model_noise is None:
        return None
    if not args.snr > 0:
        raise CryoInputError("--model_noise needs --snr > 0: the signal is scaled to that SNR against the file's noise")
    return read_noise_model(args.model_noise)


def junk_from_args(args, groups: list[tuple[float, int]]):
    """--junk and --junk_map as ``Junk`` (None without --junk)."""
    from ..simulate import Junk

    if not 0 <= args.junk < 1:
        raise CryoInputError("--junk is the fraction of junk particles: give a value in [0, 1)")
    if args.junk == 0:
        if args.junk_map is not None:
            raise CryoInputError("--junk_map makes the junk of --junk: give --junk FRACTION too")
        return None
    if args.junk_map is None:
        return Junk(args.junk)
    return Junk(args.junk, tuple(group_maps(args.junk_map, groups, args.bfactor, "--junk_map")))


def preferred_view_from_args(args):
    """--preferred_view and --uniform_fraction as ``PreferredView`` (None without --preferred_view)."""
    from ..simulate import PreferredView

    if args.preferred_view is None:
        if args.uniform_fraction != 0:
            raise CryoInputError(
                "--uniform_fraction is the uniform part of --preferred_view: give --preferred_view too"
            )
        return None
    if not (math.isfinite(args.preferred_view) and args.preferred_view > 0):
        raise CryoInputError("--preferred_view KAPPA is a concentration: give KAPPA > 0 (larger: more concentrated)")
    if not 0 <= args.uniform_fraction <= 1:
        raise CryoInputError("--uniform_fraction is a fraction: give a value in [0, 1]")
    return PreferredView(args.preferred_view, args.uniform_fraction)


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
