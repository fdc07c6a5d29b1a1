"""Optics groups of different pixel sizes and boxes in one run, as RELION 3.1 maps them onto the first group's grid
(engine.optics_frame): group 1 at 1.2 Å/px in a box of 96, group 2 at 1.35 Å/px in a box of 84, each simulated from
the packaged atomic model at its own pixel size (simulate's several optics groups: no rescaling code of ours makes the
truth).

One local-search iteration from the true poses (a unit test of the E-step, which no evaluated refinement does) finds
group 2's offsets and angles as well as group 1's; the control, the same images with group 2's pixel size written as
group 1's, mislocates them.
"""

import numpy as np
import pytest
import starfile

from cryorefine.cli.main import main as cli
from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.evaluation import pose_errors, read_poses
from cryorefine.simulate import simulate_particles

GROUPS = ((1.2, 96), (1.35, 84))  # (Å/px, box px) of optics groups 1 and 2
N, SNR = 120, 1.0
FLAGS = (
    "--K 1 --iter 1 --ini_high 4 --particle_diameter 100 --ctf --healpix_order 3 --sigma_ang 2 --offset_range 2 "
    "--offset_step 1 --j 2"
).split()


def two_group_set(d, wrong_angpix=None):
    """simulate's two optics groups in ``d``; with ``wrong_angpix`` written as group 2's pixel size in
    particles.star."""
    xyz, w = read_atoms(packaged_model())
    (a1, b1), (a2, b2) = GROUPS
    simulate_particles(
        atoms_to_map(xyz, w, b1, a1), a1, d, N, snr=SNR, seed=0, max_shift_angst=3.0,
        more_groups=[(atoms_to_map(xyz, w, b2, a2), a2)],
    )  # fmt: skip
    if wrong_angpix is not None:
        blocks = starfile.read(d / "particles.star")
        blocks["optics"].loc[1, "rlnImagePixelSize"] = wrong_angpix
        starfile.write(blocks, d / "particles.star", overwrite=True)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, wrong in (("right", None), ("wrong", GROUPS[0][0])):
        d = two_group_set(tmp_path_factory.mktemp(name), wrong)
        argv = ["classify", "--i", str(d / "particles.star"), "--o", str(d / "run/run"), "--ref",
                str(d / "truth.mrc"), *FLAGS]  # fmt: skip
        assert cli(argv) == 0
        found = read_poses(d / "run/run_it001_data.star")
        errors = pose_errors(found, read_poses(d / "particles.star"))
        group = starfile.read(d / "particles.star")["particles"]["rlnOpticsGroup"].to_numpy()[errors["truth_index"]]
        out[name] = {
            g: (
                float(np.median(errors["angle_deg"][group == g])),
                float(np.percentile(errors["shift_angst"][group == g], 90)),
            )
            for g in (1, 2)
        }
    return out


def test_the_second_group_aligns_as_the_first(runs):
    (a1, s1), (a2, s2) = runs["right"][1], runs["right"][2]
    print(f"median angle error / 90th percentile offset error: group 1 {a1:.2f}° {s1:.2f} Å, group 2 {a2:.2f}° "
          f"{s2:.2f} Å; control (group 2's pixel size written as group 1's): {runs['wrong'][2]}")  # fmt: skip
    assert a2 < 1.5 * a1 + 0.3 and s2 < 1.5 * s1 + 0.3
    a2w, s2w = runs["wrong"][2]
    assert a2w > 2 * a2 or s2w > 2 * s2  # the control: the map sampled at the wrong frequencies
