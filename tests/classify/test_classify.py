"""3D classification end to end on a tiny two-state mixture: it must separate the states.

Two states of 6msm (whole; the part above z = 20 Å removed), 120 particles each, box 32 at 6 Å/px, SNR 0.5,
searched at HEALPix order 1 (15°: fine enough for 170 Å particles at 40 Å, and 8× fewer orientations than RELION's
default order 2, which took two minutes of CI).
With classes that do not separate (a broken class dimension, priors or M-step) the accuracy is ~50 %.
"""

import numpy as np
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_star, write_star
from cryorefine.mixture import state_maps
from cryorefine.simulate import simulate_particles, without_poses

BOX, ANGPIX = 32, 6.0


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    maps = state_maps(BOX, ANGPIX, bfactor=100.0)[:2]
    sigma = None
    parts = []
    for k, vol in enumerate(maps):
        info = simulate_particles(
            vol, ANGPIX, d / f"s{k + 1}", 120, snr=0.5, seed=11 + k, noise_sigma=sigma, max_shift_angst=4.0
        )
        sigma = info["noise_sigma"]
        b = read_star(d / f"s{k + 1}" / "particles.star")
        p = b["particles"]
        p["rlnImageName"] = [f"{i + 1:06d}@s{k + 1}/particles.mrcs" for i in range(len(p))]  # from d's STAR
        p["rlnClassNumber"] = k + 1
        parts.append(p)
    import pandas as pd

    allp = pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=0).reset_index(drop=True)
    # the input as a user has it: no poses, no classes
    write_star(
        d / "particles.star", {"optics": b["optics"], "particles": without_poses(allp).drop(columns=["rlnClassNumber"])}
    )
    # as after a consensus refinement: every particle's pose, no classes (--skip_align's input)
    write_star(d / "particles_poses.star", {"optics": b["optics"], "particles": allp.drop(columns=["rlnClassNumber"])})
    avg = (read_map(d / "s1" / "truth.mrc")[0] + read_map(d / "s2" / "truth.mrc")[0]) / 2
    write_map(d / "start.mrc", low_pass_filter(torch.from_numpy(avg).double(), 40.0, ANGPIX).float().numpy(), ANGPIX)
    rc = main(
        [
            "classify",
            "--i",
            str(d / "particles.star"),
            "--o",
            str(d / "out" / "run"),
            "--ref",
            str(d / "start.mrc"),
            "--K",
            "2",
            "--iter",
            "6",
            "--tau2_fudge",
            "4",
            "--ini_high",
            "40",
            "--particle_diameter",
            "170",
            "--ctf",
            "--flatten_solvent",
            "--zero_mask",
            "--offset_range",
            "3",
            "--offset_step",
            "1.5",
            "--random_seed",
            "2",
            "--healpix_order",
            "1",
        ]
    )
    assert rc == 0
    truth = allp["rlnClassNumber"].to_numpy()
    return d, truth


def test_outputs_have_relion_names(classified):
    d, _ = classified
    for name in [
        "run_it006_class001.mrc",
        "run_it006_class002.mrc",
        "run_it006_model.star",
        "run_it006_data.star",
        "run_it006_optimiser.star",
    ]:
        assert (d / "out" / name).exists(), name


def test_states_are_separated(classified):
    d, truth = classified
    pred = read_star(d / "out" / "run_it006_data.star")["particles"]["rlnClassNumber"].to_numpy()
    acc = max(np.mean(pred == truth), np.mean(pred == 3 - truth))  # labels are arbitrary
    assert acc > 0.9, acc
    dist = read_star(d / "out" / "run_it006_model.star")["model_classes"]["rlnClassDistribution"].to_numpy()
    assert dist.min() > 0.3, dist


def skip_align(d, star: str, out: str, how: str = "--skip_align") -> np.ndarray:
    flags = "--K 2 --iter 6 --tau2_fudge 4 --ini_high 40 --particle_diameter 170 --ctf --flatten_solvent --zero_mask"
    argv = ["classify", "--i", str(d / star), "--o", str(d / out / "run"), "--ref", str(d / "start.mrc"),
            how, "--random_seed", "2", "--offset_range", "3", "--offset_step", "1", *flags.split()]  # fmt: skip
    assert main(argv) == 0
    return read_star(d / out / "run_it006_data.star")["particles"]["rlnClassNumber"].to_numpy()


def test_skip_align_classifies_at_the_known_poses(classified):
    """--skip_align (focused classification after a consensus refinement): the same mixture with every particle's
    true pose, only the classes searched: at least 95 % right, every pose as given (nothing aligned). Control: the
    same particles with their angles scrambled stay near chance."""
    d, truth = classified
    pred = skip_align(d, "particles_poses.star", "skip")
    acc = max(np.mean(pred == truth), np.mean(pred == 3 - truth))
    print(f"--skip_align: {acc:.3f} right")
    assert acc >= 0.95
    pose = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    blocks = read_star(d / "particles_poses.star")
    given = blocks["particles"]
    out = read_star(d / "skip" / "run_it006_data.star")["particles"]
    # the same particles in the same order (data.star names the stacks by their paths from the STAR file's folder)
    assert list(out["rlnImageName"]) == [f"{i}@{d / stack}" for i, stack in given["rlnImageName"].str.split("@")]
    np.testing.assert_allclose(out[pose].to_numpy(), given[pose].to_numpy(), atol=1e-4)
    rng = np.random.default_rng(0)
    blocks["particles"]["rlnAngleRot"] = rng.uniform(-180, 180, len(truth))
    blocks["particles"]["rlnAnglePsi"] = rng.uniform(-180, 180, len(truth))
    write_star(d / "scrambled.star", blocks)
    pred = skip_align(d, "scrambled.star", "scrambled")
    acc = max(np.mean(pred == truth), np.mean(pred == 3 - truth))
    print(f"control, angles scrambled: {acc:.3f} right")
    assert acc < 0.8


def test_skip_align_needs_poses(classified):
    d, _ = classified
    argv = ["classify", "--i", str(d / "particles.star"), "--o", str(d / "nop" / "run"), "--ref", str(d / "start.mrc"),
            "--skip_align", "--K", "2", "--particle_diameter", "170"]  # fmt: skip
    assert main(argv) == 2


def test_skip_rotate_finds_the_classes_and_the_offsets(classified):
    """--skip_rotate: the true orientations kept, the offsets in the STAR moved by 2 px (12 Å each way) and searched
    again with the classes (±3 px in 1 px steps): the classes as --skip_align finds them, the offsets back within a
    step of the truth (the control: the moved offsets' own error, 17 Å)."""
    d, truth = classified
    blocks = read_star(d / "particles_poses.star")
    true_offsets = blocks["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    blocks["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]] = true_offsets + [12.0, -12.0]
    write_star(d / "moved_offsets.star", blocks)
    pred = skip_align(d, "moved_offsets.star", "rotate", "--skip_rotate")
    acc = max(np.mean(pred == truth), np.mean(pred == 3 - truth))
    found = read_star(d / "rotate" / "run_it006_data.star")["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]]
    error = np.median(np.hypot(*(found.to_numpy() - true_offsets).T))
    print(f"--skip_rotate: {acc:.3f} right; median offset error {error:.2f} Å (given: 16.97)")
    assert acc >= 0.95 and error < ANGPIX
