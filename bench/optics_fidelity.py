"""Issue 20's optics check: does a set with beam tilt and anisotropic magnification refine as well as the same set
without them, and what does ignoring the columns cost?

Three auto-refines of the packaged 6msm model at 1.2 Å/px, from the same poses, defocus and noise (one seed, one
noise level), each from particles_noposes.star and the truth low-passed to 30 Å:
  plain      no aberrations
  optics     beam tilt and magnification in the images and in data_optics
  ignored    the same images with the optics columns dropped (the control)
Each run's gold-standard resolution (0.143, unfiltered halves), FSC-to-truth (0.5) of the final map and pose errors
go to OUTDIR/optics-fidelity.{json,md} with the device, date, commit and command.

usage: python bench/optics_fidelity.py OUTDIR [--gpu] [--n 6000] [--box 128] [--snr 0.1]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import starfile
import torch

from cryorefine.cli.main import main as cli
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.evaluation import map_resolution, pose_errors, read_poses
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.simulate import Microscope, simulate_particles

ANGPIX = 1.2
SCOPE = Microscope(beam_tilt_mrad=(1.5, -1.0), mag=(1.015, 0.004, 0.002, 0.99))  # 1.8 mrad; +1.5 % / −1 %
OPTICS_COLUMNS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def flags(diameter: float, how: list[str]) -> list[str]:
    """bench/fidelity_ours.py's RELION flags (auto-refine, C1, 30 Å start)."""
    return [
        "--ini_high", "30", "--particle_diameter", str(diameter), "--healpix_order", "2",
        "--auto_local_healpix_order", "3", "--offset_range", "5", "--offset_step", "2", "--low_resol_join_halves", "40",
        "--norm", "--scale", "--flatten_solvent", "--zero_mask", "--ctf", "--pad", "2", "--random_seed", "0", *how,
    ]  # fmt: skip


def build(root: Path, n: int, box: int, snr: float) -> dict:
    truth = atoms_to_map(*read_atoms(packaged_model()), box, ANGPIX, 50.0)
    plain = simulate_particles(truth, ANGPIX, root / "plain", n, snr=snr, seed=7)
    simulate_particles(truth, ANGPIX, root / "optics", n, snr=snr, seed=7, microscope=SCOPE,
                       noise_sigma=plain["noise_sigma"])  # fmt: skip
    blocks = starfile.read(root / "optics" / "particles_noposes.star")
    blocks["optics"] = blocks["optics"].drop(columns=list(OPTICS_COLUMNS))
    starfile.write(blocks, root / "optics" / "ignored_noposes.star", overwrite=True)
    t, _ = read_map(root / "plain" / "truth.mrc")
    write_map(root / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX)
    return {"n": n, "box": box, "angpix": ANGPIX, "snr": snr, "beam_tilt_mrad": SCOPE.beam_tilt_mrad, "mag": SCOPE.mag}


def refine(root: Path, name: str, star: Path, truth_dir: Path, diameter: float, how: list[str]) -> dict:
    out = root / name / "run"
    t0 = time.perf_counter()
    rc = cli(["refine", "--i", str(star), "--o", str(out), "--ref", str(root / "start.mrc"), *flags(diameter, how)])
    seconds = time.perf_counter() - t0
    if rc != 0:
        return {"rc": rc}
    h1, _ = read_map(f"{out}_half1_class001_unfil.mrc")
    h2, _ = read_map(f"{out}_half2_class001_unfil.mrc")
    final, _ = read_map(f"{out}_class001.mrc")
    truth, _ = read_map(truth_dir / "truth.mrc")
    gold = map_resolution(torch.from_numpy(h1), torch.from_numpy(h2), ANGPIX)["resolution_angst"][0.143]
    to_truth = map_resolution(torch.from_numpy(final), torch.from_numpy(truth), ANGPIX)["resolution_angst"][0.5]
    errors = pose_errors(read_poses(f"{out}_data.star"), read_poses(truth_dir / "particles.star"))
    iterations = len(list(out.parent.glob("run_it*_optimiser.star")))
    return {
        "rc": rc, "seconds": round(seconds, 1), "iterations": iterations, "gold_standard_angst": round(gold, 3),
        "fsc_to_truth_0.5_angst": round(to_truth, 3), "gold_shell": round(h1.shape[0] * ANGPIX / gold, 2),
        "median_angle_deg": round(float(torch.as_tensor(errors["angle_deg"]).median()), 3),
        "median_shift_angst": round(float(torch.as_tensor(errors["shift_angst"]).median()), 3),
    }  # fmt: skip


def write_results(stem: Path, title: str, gpu: bool, meta: dict, runs: dict, describe) -> str:
    """``stem``.json (the runs with the device, date, commit and command) and ``stem``.md (a table of the runs, under
    ``title`` and the line ``describe(result)``); returns the markdown."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit or "unknown",
        "device": device, "command": " ".join(["python", *sys.argv]), "set": meta, "runs": runs,
    }  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# {title} ({result['date']}, {device}, commit {result['commit']})",
        "",
        describe(result),
        "",
        "| run | gold-standard (Å) | shell | FSC-to-truth 0.5 (Å) | median angle (°) | median shift (Å) | iterations "
        "| s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        if r.get("rc") != 0:
            lines.append(f"| {name} | failed (rc {r.get('rc')}) | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['gold_standard_angst']} | {r['gold_shell']} | {r['fsc_to_truth_0.5_angst']} | "
            f"{r['median_angle_deg']} | {r['median_shift_angst']} | {r['iterations']} | {r['seconds']} |"
        )
    markdown = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(markdown)
    return markdown


def bench_parser(work: str) -> argparse.ArgumentParser:
    """The options of issue 20's refinement benches: OUTDIR, --gpu, --j, --n, --snr and the work folder."""
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--j", type=int, default=0)
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--work", default=work)
    return ap


def bench_folders(a) -> tuple[Path, Path, list[str]]:
    """(results folder, made; work folder; the refinement's device flags) of parsed bench_parser options."""
    out, root = Path(a.outdir), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    return out, root, ["--gpu"] if a.gpu else (["--j", str(a.j)] if a.j else [])


def main(argv=None) -> int:
    ap = bench_parser("/tmp/optics_fidelity")
    ap.add_argument("--box", type=int, default=128)
    a = ap.parse_args(argv)
    out, root, how = bench_folders(a)
    diameter = round(0.85 * a.box * ANGPIX)
    t0 = time.perf_counter()
    meta = build(root, a.n, a.box, a.snr)
    meta["simulate_seconds"] = round(time.perf_counter() - t0, 1)
    runs = {
        "plain": refine(root, "plain", root / "plain/particles_noposes.star", root / "plain", diameter, how),
        "optics": refine(root, "optics", root / "optics/particles_noposes.star", root / "optics", diameter, how),
        "ignored": refine(root, "ignored", root / "optics/ignored_noposes.star", root / "optics", diameter, how),
    }
    result = write_results(out / "optics-fidelity", "Optics fidelity", a.gpu, meta, runs, lambda r: (
        f"`{r['command']}`: {meta['n']} particles, box {meta['box']}, {ANGPIX} Å/px, SNR {meta['snr']}; "
        f"beam tilt {meta['beam_tilt_mrad']} mrad, magnification matrix {meta['mag']}."
    ))  # fmt: skip
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
