"""relion_reconstruct (RELION 3.1.3, which maps each optics group's pixel size and box onto the output's itself)
reconstructs a noise-free set of two optics groups of different pixel sizes and boxes from `cryorefine simulate
--optics` to its truth; the same stacks with the second group's pixel size written wrong in the STAR do clearly worse
(the negative control). The truth of each group is built from the atomic model at its own sampling, so this checks
the simulator's groups against RELION's own handling of them."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_star, write_star
from cryorefine.reconstruction.fsc import fsc_curve

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION binaries not installed"),
]

BOX = 48
OPTICS = f"3.5:{BOX},4.2:40"  # 168 Å boxes around the default model (6msm, 147 Å across)
TWO_THIRDS = 2 * BOX // 6  # 2/3 of Nyquist, in shells


def _fsc_to_truth(d, star: str) -> np.ndarray:
    p = subprocess.run(
        ["relion_reconstruct", "--i", star, "--o", f"{star}.mrc", "--ctf"], cwd=d, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rec, angpix = read_map(d / f"{star}.mrc")
    assert rec.shape == (BOX,) * 3 and abs(angpix - 3.5) < 1e-3  # the first group's box and pixel size
    truth = torch.from_numpy(read_map(d / "sim" / "truth.mrc")[0]).double()
    return fsc_curve(torch.from_numpy(rec).double(), truth).numpy()


def test_relion_reconstructs_two_optics_groups_to_the_truth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the project directory: image names are relative to it
    assert main(["simulate", "--o", "sim", "--optics", OPTICS, "--n", "600", "--snr", "0", "--seed", "1"]) == 0
    good = _fsc_to_truth(tmp_path, "sim/particles.star")
    blocks = read_star(tmp_path / "sim" / "particles.star")
    blocks["optics"].loc[1, "rlnImagePixelSize"] = 3.5  # group 2's images are at 4.2 Å
    write_star(tmp_path / "wrong.star", blocks)
    wrong = _fsc_to_truth(tmp_path, "wrong.star")
    shells = slice(1, TWO_THIRDS + 1)
    print(
        f"FSC to truth, shells 1..{TWO_THIRDS}: min {good[shells].min():.3f} (wrong pixel size: "
        f"{wrong[shells].min():.3f}); shells 4..{TWO_THIRDS} step 4:",
        np.round(good[4 : TWO_THIRDS + 1 : 4], 3),
        np.round(wrong[4 : TWO_THIRDS + 1 : 4], 3),
    )
    assert good[shells].min() >= 0.9
    assert wrong[shells].min() < good[shells].min() - 0.1
