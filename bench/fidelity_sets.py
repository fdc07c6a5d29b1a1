"""Four simulated sets for a side-by-side fidelity comparison of cryorefine's auto-refine with RELION 3.1.3's.

usage: python bench/fidelity_sets.py OUTROOT [--sets bigbox,tightbox,sym,prefori]   (or a,b,c,d)

Each set lands in OUTROOT/<name>/ (deterministic, CPU only, fixed seed per set):

  bigbox    4 copies of 6msm on a 40 Å ring (make_bench_data.py's placement, COPIES=4, RING_A=40, seed 0),
            box 192, 1.5 Å/px, 1000 particles, SNR 0.05, ini_high 30 Å, C1
  tightbox  adenylate kinase closed (1AKE), 0.9 Å/px, box the largest even size with particle diameter
            (2 × max atom radius + 6 Å) ≥ 0.85 of the box, 3000 particles, SNR 0.1, ini_high 20 Å, C1
  sym       4E43 HIV protease dimer (chains A+B) turned so its 2-fold is z, C2 imposed on the map,
            box 80, 1.1 Å/px, 2000 particles, SNR 0.1, ini_high 20 Å, C2
  prefori   adenylate kinase open (4AKE), box 96, 1.0 Å/px, 2000 particles, SNR 0.05, ini_high 20 Å, C1,
            70 % of the views within 30° of +z (tilt < 30°), 30 % uniform on the sphere

Poses uniform unless said (rot, psi uniform; tilt = arccos U[-1, 1]), origin offsets uniform in a 3 Å disc,
mean defocus uniform so that U and V lie in 8000-25000 Å, |U - V| ≤ 300 Å, 300 kV, Cs 2.7, Q0 0.1, one optics group.

Files per set:
  truth.mrc             the truth map (B = 50 Å², C2-symmetrised for sym) on the images' greyscale
  particles_truth.star  RELION 3.1 STAR with the true poses, CTFs and rlnRandomSubset (for relion_reconstruct)
  particles.mrcs        float32 stack: cryorefine.simulate.project_poses (CTF, shift, white Gaussian noise at SNR),
                        then divided by the noise sigma (background variance 1, as after relion_preprocess)
  particles.star        the same particles without rlnAngle*/rlnOrigin* columns, with rlnRandomSubset (1/2, a seeded
                        random split into equal halves) so both programs refine the same half sets
  start.mrc             truth low-passed to ini_high (cryorefine.fourier.filters.low_pass_filter)
  set.json              every parameter plus fingerprints (image 1's float64 mean/std/sum; sha256 of the stack's and
                        maps' float32 data, headers excluded). The sha256s match only on the same machine and torch
                        build: regenerated elsewhere, the float32 data differ in the last bits (image 1's mean
                        0.0125181071 against 0.0125180896, 2026-12-05), so compare sets across machines by the
                        float64 statistics with a relative tolerance (~1e-5), not by sha256

Image names are relative (000001@particles.mrcs): run RELION from inside the set folder (bench/relion_fidelity.sh does).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PDB = Path(os.environ.get("FIDELITY_PDB_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "pdb"))

SETS = {
    "bigbox": dict(
        model="6msm.pdb.bz2",
        box=192,
        angpix=1.5,
        n=1000,
        snr=0.05,
        ini_high=30.0,
        sym="C1",
        seed=101,
        diameter_margin=10.0,
        copies=4,
        ring_angst=40.0,
        ring_seed=0,
    ),
    "tightbox": dict(
        model="adk_closed_1AKE.pdb.gz",
        box=None,
        angpix=0.9,
        n=3000,
        snr=0.1,
        ini_high=20.0,
        sym="C1",
        seed=102,
        diameter_margin=6.0,
        min_fill=0.85,
    ),
    "sym": dict(
        model="4E43.pdb", box=80, angpix=1.1, n=2000, snr=0.1, ini_high=20.0, sym="C2", seed=103, diameter_margin=10.0
    ),
    "prefori": dict(
        model="adk_open_4AKE.pdb.gz",
        box=96,
        angpix=1.0,
        n=2000,
        snr=0.05,
        ini_high=20.0,
        sym="C1",
        seed=104,
        diameter_margin=10.0,
        pref_fraction=0.7,
        pref_max_tilt=30.0,
    ),
}
ALIASES = {"a": "bigbox", "b": "tightbox", "c": "sym", "d": "prefori"}
MICROSCOPE = dict(voltage=300.0, cs=2.7, q0=0.1)
DEFOCUS = (8000.0, 25000.0)
ASTIGMATISM = 300.0
MAX_SHIFT = 3.0
BFACTOR = 50.0


# ---------------------------------------------------------------------------------------------- atomic models


def _rand_rot(rng):
    """make_bench_data.py's uniform rotation from a random unit quaternion (same draws)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def ring_complex(xyz, w, copies: int, ring: float, seed: int):
    """COPIES randomly turned copies on random directions at RING Å from the centre, as make_bench_data.py places them
    (same numpy draws for the same seed); centred on the atoms' mean."""
    rng = np.random.default_rng(seed)
    atoms = xyz - xyz.mean(0)
    parts = []
    for _ in range(copies):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        parts.append(atoms @ _rand_rot(rng).T + (ring * d if copies > 1 else 0))
    out = np.concatenate(parts)
    return out - out.mean(0), np.tile(w, copies)


def c2_asymmetry(vol: torch.Tensor) -> float:
    """1 - correlation of the map with itself turned 180° about z through the centre voxel (0 for a C2 map)."""
    d = vol.shape[-1]
    turned = (
        torch.roll(torch.flip(vol, dims=(1, 2)), shifts=(1, 1), dims=(1, 2))
        if d % 2 == 0
        else torch.flip(vol, dims=(1, 2))
    )
    a, b = vol - vol.mean(), turned - turned.mean()
    return float(1 - (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def build_truth(name: str, p: dict, info: dict) -> tuple[torch.Tensor, int, float]:
    """(truth map float64, box, particle diameter Å)."""
    from cryorefine.density import atoms_to_map, read_atoms, two_fold_axis_to_z
    from cryorefine.reconstruction.symmetrise import symmetrise_map

    path = PDB / p["model"]
    if name == "sym":
        # the crystal frame's 2-fold is arbitrary: render the raw model to measure that, then use A+B turned 2-fold -> z
        xyz_raw, w_raw = read_atoms(path)
        info["c2_asymmetry_raw_model_frame"] = round(
            c2_asymmetry(atoms_to_map(xyz_raw, w_raw, p["box"], p["angpix"], BFACTOR)), 4
        )
        xyz, w = two_fold_axis_to_z(path)
        centre = False  # the 2-fold passes through the origin = centre voxel
        radius = float(np.linalg.norm(xyz, axis=1).max())
    else:
        xyz, w = read_atoms(path)
        if name == "bigbox":
            xyz, w = ring_complex(xyz, w, p["copies"], p["ring_angst"], p["ring_seed"])
        centre = True
        radius = float(np.linalg.norm(xyz - xyz.mean(0), axis=1).max())
    diameter = 2 * radius + p["diameter_margin"]
    box = p["box"]
    if box is None:  # tightbox: largest even box whose size in Å the particle diameter fills to at least min_fill
        box = int(diameter / (p["min_fill"] * p["angpix"])) // 2 * 2
    if diameter > box * p["angpix"]:
        raise SystemExit(f"{name}: particle diameter {diameter:.1f} Å does not fit the {box * p['angpix']:.1f} Å box")
    info.update(atoms=int(len(xyz)), max_atom_radius_angst=round(radius, 2))
    vol = atoms_to_map(xyz, w, box, p["angpix"], BFACTOR, centre=centre)
    if p["sym"].upper() != "C1":
        info["c2_asymmetry_after_turning_2fold_to_z"] = round(c2_asymmetry(vol), 4)
        vol = symmetrise_map(vol, p["sym"])
        info["c2_asymmetry_after_symmetrise"] = round(c2_asymmetry(vol), 6)
    return vol, box, round(diameter, 1)


# ---------------------------------------------------------------------------------------------- poses


def make_poses(name: str, p: dict, box: int, rng: np.random.Generator) -> pd.DataFrame:
    n = p["n"]
    rot = rng.uniform(-180.0, 180.0, n)
    psi = rng.uniform(-180.0, 180.0, n)
    cos_tilt = rng.uniform(-1.0, 1.0, n)
    if "pref_fraction" in p:  # a random pref_fraction of the views on the cap tilt < pref_max_tilt (uniform on the cap)
        k = int(round(p["pref_fraction"] * n))
        cap = rng.permutation(n)[:k]
        cos_tilt[cap] = rng.uniform(np.cos(np.radians(p["pref_max_tilt"])), 1.0, k)
    tilt = np.degrees(np.arccos(np.clip(cos_tilt, -1.0, 1.0)))
    r = MAX_SHIFT * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2 * np.pi, n)
    lo, hi = DEFOCUS[0] + ASTIGMATISM / 2, DEFOCUS[1] - ASTIGMATISM / 2
    dmean = rng.uniform(lo, hi, n)
    astig = rng.uniform(0.0, ASTIGMATISM, n)
    dang = rng.uniform(0.0, 180.0, n)
    subset = np.ones(n, dtype=int)
    subset[rng.permutation(n)[n // 2 :]] = 2
    return pd.DataFrame(
        {
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": r * np.cos(phi),
            "rlnOriginYAngst": r * np.sin(phi),
            "rlnDefocusU": dmean + astig / 2,
            "rlnDefocusV": dmean - astig / 2,
            "rlnDefocusAngle": dang,
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "rlnRandomSubset": subset,
        }
    )


def optics_table(box: int, angpix: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [angpix],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [MICROSCOPE["voltage"]],
            "rlnSphericalAberration": [MICROSCOPE["cs"]],
            "rlnAmplitudeContrast": [MICROSCOPE["q0"]],
        }
    )


# ---------------------------------------------------------------------------------------------- one set


def _data_sha256(path: Path) -> str:
    """sha256 of an MRC file's data (little-endian float32), not of its header (mrcfile writes a time stamp there)."""
    import mrcfile

    h = hashlib.sha256()
    with mrcfile.mmap(path, mode="r") as m:
        data = m.data.reshape(-1, *m.data.shape[-2:])
        for i in range(0, len(data), 256):
            h.update(np.ascontiguousarray(data[i : i + 256], dtype="<f4").tobytes())
    return h.hexdigest()


def build_set(name: str, root: Path) -> dict:
    import mrcfile

    from cryorefine.fourier.filters import low_pass_filter
    from cryorefine.io.mrc import write_map
    from cryorefine.io.star import read_star, write_star
    from cryorefine.simulate import project_poses

    t0 = time.time()
    p = SETS[name]
    out = (root / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    vol, box, diameter = build_truth(name, p, info)
    angpix = p["angpix"]
    rng = np.random.default_rng(p["seed"])
    parts = make_poses(name, p, box, rng)
    poses = out / "poses_tmp.star"
    write_star(poses, {"optics": optics_table(box, angpix), "particles": parts})
    with contextlib.chdir(out):  # image names relative to the set folder, where bench/relion_fidelity.sh runs RELION
        summary = project_poses(
            vol.float(), angpix, out, poses, snr=p["snr"], seed=p["seed"], batch=256, device=None, ctf=True
        )
    poses.unlink()
    (out / "particles.star").replace(out / "particles_truth.star")
    # greyscale: background noise variance 1 (as after relion_preprocess); the truth on the same scale
    sigma = float(summary["noise_sigma"])
    with mrcfile.mmap(out / "particles.mrcs", mode="r+") as m:
        m.data[...] = m.data / np.float32(sigma)
        m.update_header_stats()
        m.flush()
        first = np.asarray(m.data[0], dtype=np.float64)
    truth = (vol / sigma).float()
    write_map(out / "truth.mrc", truth.numpy(), angpix)
    start = low_pass_filter(truth.double(), p["ini_high"], angpix).float()
    write_map(out / "start.mrc", start.numpy(), angpix)
    blocks = read_star(out / "particles_truth.star")
    user = blocks["particles"].drop(
        columns=[c for c in blocks["particles"].columns if c.startswith(("rlnAngle", "rlnOrigin"))]
    )
    write_star(out / "particles.star", {"optics": blocks["optics"], "particles": user})
    tilt = parts["rlnAngleTilt"].to_numpy()
    meta = {
        "name": name,
        "model": str(PDB / p["model"]),
        "box": box,
        "angpix": angpix,
        "n": p["n"],
        "snr": p["snr"],
        "ini_high": p["ini_high"],
        "sym": p["sym"],
        "particle_diameter": diameter,
        "seed": p["seed"],
        "bfactor": BFACTOR,
        "max_shift_angst": MAX_SHIFT,
        "defocus_range_angst": list(DEFOCUS),
        "max_astigmatism_angst": ASTIGMATISM,
        "voltage_kv": MICROSCOPE["voltage"],
        "cs_mm": MICROSCOPE["cs"],
        "amplitude_contrast": MICROSCOPE["q0"],
        "diameter_fill_of_box": round(diameter / (box * angpix), 3),
        "noise_sigma_before_rescale": sigma,
        "clean_variance_before_rescale": summary["clean_variance"],
        "images_divided_by_noise_sigma": True,
        "random_subset_counts": [
            int((parts["rlnRandomSubset"] == 1).sum()),
            int((parts["rlnRandomSubset"] == 2).sum()),
        ],
        "fraction_tilt_below_30": round(float((tilt < 30).mean()), 4),
        **{k: v for k, v in p.items() if k not in ("model", "box", "angpix", "n", "snr", "ini_high", "sym", "seed")},
        **info,
        "fingerprint": {
            "image1_mean": float(first.mean()),
            "image1_std": float(first.std()),
            "image1_sum": float(first.sum()),
            "particles_data_sha256": _data_sha256(out / "particles.mrcs"),
            "truth_data_sha256": _data_sha256(out / "truth.mrc"),
            "start_data_sha256": _data_sha256(out / "start.mrc"),
        },
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "seconds": round(time.time() - t0, 1),
    }
    (out / "set.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outroot", help="folder for the sets (one sub-folder each)")
    ap.add_argument(
        "--sets",
        default="bigbox,tightbox,sym,prefori",
        help="comma-separated names (bigbox,tightbox,sym,prefori or a,b,c,d)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [ALIASES.get(s.strip(), s.strip()) for s in args.sets.split(",") if s.strip()]
    bad = [s for s in names if s not in SETS]
    if bad:
        ap.error(f"unknown set(s) {bad}; choose from {list(SETS)} or a,b,c,d")
    root = Path(args.outroot)
    for name in names:
        meta = build_set(name, root)
        print(
            json.dumps(
                {
                    k: meta[k]
                    for k in ("name", "box", "angpix", "particle_diameter", "n", "snr", "ini_high", "sym", "seconds")
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
