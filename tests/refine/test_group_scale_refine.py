"""--scale end to end: particles of 16 micrographs, each micrograph's signal multiplied by a known scale from 0.7-1.3
(the noise not: RELION's model X = s·CTF·P + noise), refined and classified from the STAR without angles or offsets;
the scales in model.star's groups table follow the truth."""

import numpy as np
import pandas as pd
import pytest
import torch

from cryorefine.cli.main import main
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_star
from cryorefine.mixture import state_maps
from cryorefine.refine.groups import after_job_folder
from cryorefine.simulate import MICROGRAPHS_TRUTH_STAR, NO_POSES_STAR, Micrographs, simulate_particles

BOX, ANGPIX, MICS, PER_MIC, SNR = 32, 6.0, 16, 25, 0.5
COMMON = "--particle_diameter 170 --ctf --flatten_solvent --zero_mask --offset_range 2 --offset_step 1 --j 1"


def scaled_set(d, mics: int = MICS, per_mic: int = PER_MIC, snr: float = SNR, seed: int = 7) -> pd.Series:
    """simulate's particles of ``mics`` micrographs, each micrograph's signal scaled by U(0.7, 1.3)
    (particles_noposes.star, micrographs_truth.star), and start.mrc (the truth low-passed to 30 Å) in ``d``; returns
    each micrograph's true scale by RELION's group name (its particle-weighted mean 1)."""
    simulate_particles(state_maps(BOX, ANGPIX, 100.0)[0], ANGPIX, d, mics * per_mic, snr=snr, seed=seed,
                       max_shift_angst=3.0, micrographs=Micrographs(mics, scale=(0.7, 1.3)))  # fmt: skip
    mics_truth = read_star(d / MICROGRAPHS_TRUTH_STAR)["micrographs"]
    truth = mics_truth["rlnGroupScaleCorrection"].astype(float).to_numpy()
    names = [after_job_folder(str(m)) for m in mics_truth["rlnMicrographName"]]
    t, _ = read_map(d / "truth.mrc")
    write_map(d / "start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, ANGPIX).float().numpy(), ANGPIX)
    return pd.Series(truth / truth.mean(), index=names)  # equal groups: RELION's normalisation is the plain mean


def group_scales(model_star) -> pd.Series:
    """rlnGroupScaleCorrection by micrograph (group) name."""
    groups = read_star(model_star)["model_groups"]
    return groups.set_index("rlnGroupName")["rlnGroupScaleCorrection"].astype(float)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    return d, scaled_set(d)


def _correlation(scales: pd.Series, truth: pd.Series) -> float:
    return float(np.corrcoef(scales[truth.index].to_numpy(), truth.to_numpy())[0, 1])


def test_refine_recovers_the_micrograph_scales(scaled):
    d, truth = scaled
    out = d / "refine"
    argv = f"refine --i {d / NO_POSES_STAR} --o {out / 'run'} --ref {d / 'start.mrc'} --ini_high 30 --scale"
    assert main([*argv.split(), *COMMON.split(), "--healpix_order", "1", "--iter", "4", "--random_seed", "3"]) == 0
    model = sorted(out.glob("run_it*_half1_model.star"))[-1]
    scales = group_scales(model)
    r = _correlation(scales, truth)
    shuffled = _correlation(
        scales, pd.Series(truth.to_numpy()[np.random.default_rng(0).permutation(len(truth))], truth.index)
    )
    print(f"refine --scale: r = {r:.3f} with the truth ({model.name}), {shuffled:.3f} with it shuffled")
    assert r >= 0.95
    assert shuffled < 0.6
    assert abs(scales.std() / truth.std() - 1.0) < 0.5  # the spread itself, not only its order


def test_classify_recovers_the_micrograph_scales_and_without_scale_keeps_1(scaled):
    d, truth = scaled
    base = f"classify --i {d / NO_POSES_STAR} --ref {d / 'start.mrc'} --K 2 --tau2_fudge 4 --ini_high 30"
    flags = [*COMMON.split(), "--healpix_order", "1", "--iter", "4", "--random_seed", "3"]
    assert main([*base.split(), "--o", str(d / "classify" / "run"), "--scale", *flags]) == 0
    scales = group_scales(d / "classify" / "run_it004_model.star")
    r = _correlation(scales, truth)
    print(f"classify --scale: r = {r:.3f} with the truth")
    assert r >= 0.95
    assert main([*base.split(), "--o", str(d / "plain" / "run"), "--iter", "1", *flags[:-4], "--random_seed", "3"]) == 0
    assert (group_scales(d / "plain" / "run_it001_model.star") == 1.0).all()
