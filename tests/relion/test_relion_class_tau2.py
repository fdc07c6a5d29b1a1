"""Classification's τ² against Debian's RELION 3.1.3: relion_refine --K 2 for two iterations on a tiny simulated set,
then our τ² from each iteration's starting class map (mstep/tau2.py tau2_from_reference, on the padded, gridding
pre-corrected transform as the E-step prepares it) against the rlnReferenceTau2 RELION wrote for that iteration.

RELION's transform is normalised by 1/box² (ours is the plain DFT), so ours is divided by box⁴. Agreement within
10 % on shells 1 .. current size / 2 - 1 (measured 0.93-1.01; shell 0 is never regularised). Control: half the
power of the unpadded map, the rule this replaced, is up to ~40 % smaller at mid resolution (a stronger prior)
and must fail the same bounds.
"""

import shutil
import subprocess

import numpy as np
import pytest
import starfile
import torch

from cryorefine.density import atoms_to_map, packaged_model, read_atoms
from cryorefine.fourier.grids import rfft3_centered, shell_index_3d
from cryorefine.io.mrc import read_map
from cryorefine.mstep.tau2 import tau2_from_reference
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.simulate import simulate_particles

pytestmark = [pytest.mark.relion, pytest.mark.skipif(shutil.which("relion_refine") is None, reason="RELION binaries not installed")]

BOX, ANGPIX = 32, 6.0
LOW, HIGH = 0.90, 1.10


@pytest.fixture(scope="module")
def relion_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("relion_class_tau2")
    xyz, w = read_atoms(packaged_model())
    simulate_particles(atoms_to_map(xyz, w, BOX, ANGPIX), ANGPIX, d, 40, snr=0.1, seed=2)
    (d / "r").mkdir()
    p = subprocess.run(["relion_refine", "--i", "particles.star", "--o", "r/run", "--ref", "truth.mrc", "--K", "2", "--iter", "2",
                        "--tau2_fudge", "4", "--ini_high", "30", "--particle_diameter", "170", "--healpix_order", "1", "--offset_range", "2",
                        "--offset_step", "2", "--ctf", "--flatten_solvent", "--zero_mask", "--pad", "2", "--j", "2", "--random_seed", "0"],
                       cwd=d, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return d / "r"


def unpadded_power(vol: torch.Tensor) -> torch.Tensor:
    f = rfft3_centered(vol)
    s = shell_index_3d(vol.shape[-1]).flatten()
    keep = s <= BOX // 2
    p = torch.zeros(BOX // 2 + 1, dtype=torch.float64).index_add_(0, s[keep], (f.abs() ** 2).flatten()[keep])
    c = torch.zeros(BOX // 2 + 1, dtype=torch.float64).index_add_(0, s[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return p / c / 2.0


@pytest.mark.parametrize("iteration", [1, 2])
def test_class_tau2_matches_relion(relion_run, iteration):
    model = starfile.read(relion_run / f"run_it{iteration:03d}_model.star")
    current = int(model["model_general"]["rlnCurrentImageSize"])
    shells = slice(1, current // 2)
    for k in (1, 2):
        vol = torch.from_numpy(read_map(relion_run / f"run_it{iteration - 1:03d}_class{k:03d}.mrc")[0]).double()
        theirs = model[f"model_class_{k}"]["rlnReferenceTau2"].to_numpy()[shells]
        ours = tau2_from_reference(prepare_padded_transform(vol, 2), current // 2).numpy()[shells] / BOX**4
        ratio = ours / theirs
        print(f"it {iteration} class {k}: ours/RELION {np.round(ratio, 3)}")
        assert LOW < ratio.min() and ratio.max() < HIGH
        control = unpadded_power(vol).numpy()[shells] / BOX**4 / theirs
        assert not (LOW < control.min() and control.max() < HIGH), np.round(control, 3)
