"""3D classification on a simulated 3-state mixture of 6msm: accuracy against the truth, against an oracle, and timing.

usage: python bench/classify_mixture.py DIR N BOX ANGPIX [--gpu] [--iter 25] [--K 3] [--input particles_in.star]
       python bench/classify_mixture.py DIR N BOX ANGPIX --score DIR/relion/run_it025   (score RELION's or any run)
Simulates DIR/particles.star (states in rlnClassNumber) if absent, runs `cryorefine classify` into DIR/ours/run,
then an oracle E-step with the true maps, and prints one JSON object: fraction of particles in the right class
(class labels matched to states by the FSC of the class maps with the truth maps), each class map's FSC-to-truth
at 0.5, the oracle's fraction, and wall times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from cryorefine.cli.main import main as cli
from cryorefine.evaluation import map_resolution
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_star
from cryorefine.mixture import simulate_mixture


def match_classes(class_maps, truth_maps, angpix):
    """Assignment class -> state maximising the summed FSC (area under the curve), exhaustive for K <= 6."""
    K, S = len(class_maps), len(truth_maps)
    score = np.zeros((K, S))
    for k, m in enumerate(class_maps):
        for s, t in enumerate(truth_maps):
            score[k, s] = float(map_resolution(torch.from_numpy(m), torch.from_numpy(t), angpix)["fsc"][1:].mean())
    best, best_perm = -1e9, None
    for perm in itertools.permutations(range(S), min(K, S)):
        v = sum(score[k, perm[k]] for k in range(len(perm)))
        if v > best:
            best, best_perm = v, perm
    return {k: best_perm[k] for k in range(len(best_perm))}, score


def accuracy(data_star, truth_classes, mapping):
    pred = read_star(data_star)["particles"]["rlnClassNumber"].to_numpy() - 1
    mapped = np.array([mapping.get(int(p), -1) for p in pred])
    return float(np.mean(mapped == truth_classes))


def score(prefix: str, K: int, truths, truth_classes, angpix: float) -> dict:
    """Accuracy and class-map FSC-to-truth of the outputs PREFIX_classNNN.mrc / PREFIX_data.star (ours or RELION's)."""
    class_maps = [read_map(f"{prefix}_class{k + 1:03d}.mrc")[0] for k in range(K)]
    mapping, _ = match_classes(class_maps, truths, angpix)
    res = {
        k: map_resolution(torch.from_numpy(class_maps[k]), torch.from_numpy(truths[s]), angpix)["resolution_angst"][0.5]
        for k, s in mapping.items()
    }
    return {
        "accuracy": accuracy(f"{prefix}_data.star", truth_classes, mapping),
        "class_to_state": {int(k): int(v) for k, v in mapping.items()},
        "class_fsc_to_truth_0.5_angst": {int(k): round(float(v), 2) for k, v in res.items()},
    }


def main():
    ap = argparse.ArgumentParser()
    (
        ap.add_argument("dir"),
        ap.add_argument("n", type=int),
        ap.add_argument("box", type=int),
        ap.add_argument("angpix", type=float),
    )
    (
        ap.add_argument("--gpu", action="store_true"),
        ap.add_argument("--iter", type=int, default=25),
        ap.add_argument("--K", type=int, default=3),
    )
    ap.add_argument("--snr", type=float, default=0.05), ap.add_argument("--diameter", type=float, default=0.0)
    ap.add_argument("--tau2_fudge", type=float, default=4.0), ap.add_argument("--ini_high", type=float, default=40.0)
    ap.add_argument("--healpix_order", type=int, default=2), ap.add_argument("--extra", default="")
    ap.add_argument(
        "--third",
        default="moved",
        choices=["moved", "removed"],
        help="the third state: one side moved 12 Å, or removed",
    )
    ap.add_argument(
        "--input",
        default="particles_in.star",
        help="STAR file in DIR to classify (default: the one without the true poses and states)",
    )
    ap.add_argument("--name", default="ours", help="output folder in DIR for this run")
    ap.add_argument(
        "--ref_scale",
        type=float,
        default=1.0,
        help="multiply the start map by this (a reference on another greyscale, the case --firstiter_cc exists for)",
    )
    ap.add_argument("--score", help="only score existing outputs with this prefix (e.g. DIR/relion/run_it025) and exit")
    a = ap.parse_args()
    d = Path(a.dir)
    if a.score:
        truths = [read_map(d / f"state{s}" / "truth.mrc")[0] for s in (1, 2, 3)]
        truth_classes = read_star(d / "particles.star")["particles"]["rlnClassNumber"].to_numpy() - 1
        print(json.dumps(score(a.score, a.K, truths, truth_classes, a.angpix)))
        return
    if not (d / "particles.star").exists():
        simulate_mixture(d, a.n, a.box, a.angpix, snr=a.snr, seed=0, device="cuda" if a.gpu else None, third=a.third)
    truths = [read_map(d / f"state{s}" / "truth.mrc")[0] for s in (1, 2, 3)]
    start = low_pass_filter(torch.from_numpy(np.mean(truths, 0)).double(), a.ini_high, a.angpix).float().numpy()
    write_map(d / "start.mrc", start * a.ref_scale, a.angpix)
    truth_classes = read_star(d / "particles.star")["particles"]["rlnClassNumber"].to_numpy() - 1
    diameter = a.diameter or 0.9 * a.box * a.angpix
    args = [
        "classify",
        "--i",
        str(d / a.input),
        "--o",
        str(d / a.name / "run"),
        "--ref",
        str(d / "start.mrc"),
        "--K",
        str(a.K),
        "--iter",
        str(a.iter),
        "--tau2_fudge",
        str(a.tau2_fudge),
        "--ini_high",
        str(a.ini_high),
        "--particle_diameter",
        str(diameter),
        "--healpix_order",
        str(a.healpix_order),
        "--ctf",
        "--flatten_solvent",
        "--zero_mask",
        "--random_seed",
        "0",
    ] + a.extra.split()
    if a.gpu:
        args.append("--gpu")
    t0 = time.perf_counter()
    assert cli(args) == 0
    wall = time.perf_counter() - t0
    ours = score(f"{d}/{a.name}/run_it{a.iter:03d}", a.K, truths, truth_classes, a.angpix)
    # oracle: one E-step against the true maps (classes = states), no M-step influence
    from dataclasses import replace

    from cryorefine.refine.classify3d import ClassifyConfig, ClassifyMode
    from cryorefine.refine.context import open_run
    from cryorefine.refine.loop import iterate

    ocfg = ClassifyConfig(
        particles=str(d / a.input),
        output_root=str(d / "oracle" / "run"),
        reference=str(d / "start.mrc"),
        K=3,
        max_iter=1,
        particle_diameter=diameter,
        ctf=True,
        flatten_solvent=True,
        zero_mask=True,
        device="cuda" if a.gpu else "cpu",
        healpix_order=a.healpix_order,
        ini_high=a.ini_high,
    )
    mode = ClassifyMode(3)
    octx = open_run(ocfg, None, {"references": 3, "backprojectors": 3, "join_halves": False})
    start = mode.initial_state(octx, read_map(ocfg.reference)[0])
    start = replace(
        start,
        maps=tuple(torch.from_numpy(t) for t in truths),
        classes=replace(start.classes, initial_class=None, resolution_shell=(a.box // 2,) * 3),
    )
    t1 = time.perf_counter()
    oracle, _ = iterate(mode, octx, start, t1)
    oracle_wall = time.perf_counter() - t1
    oracle_acc = float(np.mean(oracle.poses.class_number - 1 == truth_classes))
    out = {
        "particles": int(len(truth_classes)),
        "K": a.K,
        "iterations": a.iter,
        "healpix_order": a.healpix_order,
        "extra": a.extra,
        "ref_scale": a.ref_scale,
        **ours,
        "oracle_accuracy": oracle_acc,
        "wall_s": round(wall, 1),
        "s_per_iteration": round(wall / a.iter, 2),
        "oracle_estep_s": round(oracle_wall, 2),
        "device": torch.cuda.get_device_name(0) if a.gpu else "cpu",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
