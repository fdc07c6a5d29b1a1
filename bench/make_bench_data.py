# Copied from /work/shared/bench/make_bench_data.py (the benchmark data of the paper-sized RELION-5 timings in
# /work/shared/bench/README.md; sha256 aabc0640d79a...). Arguments and seeds unchanged. One change: the default model
# path falls back to the packaged src/cryorefine/data/6msm.pdb.bz2 when ../data/pdb/6msm.pdb.bz2 is absent (same file).
"""Synthetic benchmark data shaped like a real data set, for timing refinement programs side by side.

A pseudo-complex of COPIES copies of an atomic model (default 6msm, ~9.5k atoms each) placed around a
centre with random orientations, rendered as a density (Gaussian per atom, B≈50) on BOX³ at APIX, and a
RELION 3.1 STAR of N random poses, shifts and defoci. The caller projects the poses with CTF (our
simulate, or relion_project --ctf --ang poses.star) and adds noise with add_noise.py. The complex is C1.

usage: make_bench_data.py OUTDIR BOX APIX N [COPIES=6] [RING_RADIUS_A=70] [SEED=0]
Writes OUTDIR/truth.mrc, OUTDIR/poses.star. numpy only.
"""

import bz2
import gzip
import os
import sys
import numpy as np


def read_atoms(path):
    op = bz2.open if path.endswith(".bz2") else gzip.open if path.endswith(".gz") else open
    xyz = [
        (float(line[30:38]), float(line[38:46]), float(line[46:54]))
        for line in op(path, "rt")
        if line.startswith(("ATOM", "HETATM")) and line[76:78].strip() != "H"
    ]
    xyz = np.array(xyz)
    return xyz - xyz.mean(0)


def rand_rot(rng):
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


def write_mrc(fn, vol, apix):
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    nz, ny, nx = vol.shape
    hdr = np.zeros(256, dtype=np.int32)
    hf = hdr.view(np.float32)
    hdr[0:3] = (nx, ny, nz)
    hdr[3] = 2
    hdr[7:10] = (nx, ny, nz)
    hf[10:13] = (nx * apix, ny * apix, nz * apix)
    hf[13:16] = 90.0
    hdr[16:19] = (1, 2, 3)
    hf[19], hf[20], hf[21] = vol.min(), vol.max(), vol.mean()
    hdr[22] = 1
    hb = hdr.view(np.uint8)
    hb[208:212] = np.frombuffer(b"MAP ", np.uint8)
    hb[212:216] = (0x44, 0x44, 0, 0)
    hf[54] = vol.std()
    with open(fn, "wb") as f:
        f.write(hdr.tobytes())
        f.write(vol.tobytes())


def main():
    out, box, apix, n = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    copies = int(sys.argv[5]) if len(sys.argv) > 5 else 6
    ring = float(sys.argv[6]) if len(sys.argv) > 6 else 70.0
    seed = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    rng = np.random.default_rng(seed)
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, "..", "data", "pdb", "6msm.pdb.bz2")
    if not os.path.exists(default):  # cryorefine: the packaged copy (identical file, sha256 d1386d2c...)
        default = os.path.join(here, "..", "src", "cryorefine", "data", "6msm.pdb.bz2")
    atoms = read_atoms(os.environ.get("BENCH_MODEL") or default)
    parts = []
    for c in range(copies):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        parts.append(atoms @ rand_rot(rng).T + (ring * d if copies > 1 else 0))
    xyz = np.concatenate(parts)
    xyz -= xyz.mean(0)
    # trilinear splat of atoms onto the grid, then a Gaussian blur in Fourier space (B = 50 Å²)
    g = xyz / apix + box // 2
    i0 = np.floor(g).astype(int)
    f = g - i0
    vol = np.zeros((box, box, box), np.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                np.add.at(vol, (i0[:, 2] + dz, i0[:, 1] + dy, i0[:, 0] + dx), w)
    k = [np.fft.fftfreq(box)] * 2 + [np.fft.rfftfreq(box)]
    kz, ky, kx = np.meshgrid(*k, indexing="ij")
    s2 = (kx**2 + ky**2 + kz**2) / apix**2
    vol = np.fft.irfftn(np.fft.rfftn(vol) * np.exp(-50.0 * s2 / 4), s=vol.shape, axes=(0, 1, 2))
    os.makedirs(out, exist_ok=True)
    write_mrc(os.path.join(out, "truth.mrc"), vol / vol.std(), apix)
    # poses: uniform rotations, shifts within ±3 Å, defocus 1-3 µm with small astigmatism
    rows = []
    for i in range(n):
        r = rand_rot(rng)  # ZYZ angles of a uniform rotation
        tilt = np.degrees(np.arccos(np.clip(r[2, 2], -1, 1)))
        rot = np.degrees(np.arctan2(r[2, 1], r[2, 0]))
        psi = np.degrees(np.arctan2(r[1, 2], -r[0, 2]))
        du = rng.uniform(10000, 30000)
        dv = du - rng.uniform(0, 500)
        rows.append(
            f"{rot:.3f} {tilt:.3f} {psi:.3f} {rng.uniform(-3, 3):.3f} {rng.uniform(-3, 3):.3f} "
            f"{du:.1f} {dv:.1f} {rng.uniform(0, 180):.2f} 1 mic{i // 200:04d}.mrc"
        )
    with open(os.path.join(out, "poses.star"), "w") as fh:
        fh.write(
            "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
            "_rlnAmplitudeContrast #3\n_rlnSphericalAberration #4\n_rlnVoltage #5\n_rlnImagePixelSize #6\n"
            "_rlnImageSize #7\n_rlnImageDimensionality #8\n"
            f"1 opticsGroup1 0.1 2.7 300 {apix} {box} 2\n\n# version 30001\n\ndata_particles\n\nloop_\n"
            "_rlnAngleRot #1\n_rlnAngleTilt #2\n_rlnAnglePsi #3\n_rlnOriginXAngst #4\n_rlnOriginYAngst #5\n"
            "_rlnDefocusU #6\n_rlnDefocusV #7\n_rlnDefocusAngle #8\n_rlnOpticsGroup #9\n_rlnMicrographName #10\n"
        )
        fh.write("\n".join(rows) + "\n")
    print(f"{out}: box {box}, {apix} Å/px, {len(xyz)} atoms, {n} poses")


if __name__ == "__main__":
    main()
