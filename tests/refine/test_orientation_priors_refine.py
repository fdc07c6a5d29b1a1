"""Local refinement of a consensus about the STAR's angle priors (rlnAngleRot/Tilt/PsiPrior with --sigma_rot,
--sigma_tilt, --sigma_psi), end to end through `cryorefine refine`, and the schedule's rules for the three widths.

The runs start from the priors (rlnAngleRot/Tilt/Psi = the priors): that is what the feature is for, a local
refinement of a consensus whose angles are the priors. With priors that are the truth plus 2° of noise the poses stay
near them (and the truth); with priors 20° off in tilt and psi (the control) the search about them cannot reach the
truth: the poses stay near the wrong priors and the map is worse."""

import json
from types import SimpleNamespace

import numpy as np
import torch

from cryorefine.cli.main import main
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.io.star import read_star, write_star
from cryorefine.refine.auto_refine import initial_schedule
from cryorefine.refine.config import RefineConfig
from cryorefine.refine.schedule import Schedule

from small_set import packaged_model_set

N, SIGMA = 60, 3.0
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def geodesic_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) angle of the rotation between poses a and b (n, 3) (rot, tilt, psi in degrees)."""
    A, B = (euler_to_matrix(*(torch.as_tensor(x[:, i]) for i in range(3))) for x in (a, b))
    cos = ((A.transpose(1, 2) @ B).diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1))).numpy()


def refine_about(d, blocks, truth: np.ndarray, priors: np.ndarray, name: str):
    """Run a 2-iteration local refinement from and about ``priors``: (final poses (n, 3), resolution Å, data table)."""
    p = blocks["particles"].copy()
    for i, col in enumerate(ANGLES):
        p[col] = priors[:, i]
        p[f"{col}Prior"] = priors[:, i]
    star = d / f"{name}.star"
    write_star(star, {**blocks, "particles": p})
    (d / name).mkdir()
    flags = ["--particle_diameter", "120", "--ini_high", "20", "--healpix_order", "3", "--offset_range", "1",
             "--offset_step", "1", "--ctf", "--iter", "2"]  # fmt: skip
    sigmas = ["--sigma_rot", str(SIGMA), "--sigma_tilt", str(SIGMA), "--sigma_psi", str(SIGMA)]
    out = d / name / "run"
    assert main(["refine", "--i", str(star), "--o", str(out), "--ref", str(d / "truth.mrc"), *flags, *sigmas]) == 0
    data = read_star(d / name / "run_data.star")["particles"]
    summary = [json.loads(line.split("finished: ", 1)[1]) for line in open(f"{out}.log") if "finished: " in line]
    return data[list(ANGLES)].to_numpy(np.float64), summary[-1]["final_resolution_angst"], data


def test_local_refinement_stays_about_the_priors(tmp_path):
    d = packaged_model_set(tmp_path, N, seed=5, box=32, angpix=6.0)
    blocks = read_star(d / "particles.star")  # simulate's true poses
    truth = blocks["particles"][list(ANGLES)].to_numpy(np.float64)
    rng = np.random.default_rng(0)
    good = truth + rng.normal(0, 2.0, truth.shape)
    good[:, 1] = np.clip(good[:, 1], 0, 180)
    wrong = good.copy()
    wrong[:, 1] = np.where(truth[:, 1] < 160, good[:, 1] + 20, good[:, 1] - 20)
    wrong[:, 2] += 20

    poses, res_good, data = refine_about(d, blocks, truth, good, "good")
    to_truth, to_prior = np.median(geodesic_deg(poses, truth)), np.median(geodesic_deg(poses, good))
    assert to_truth < 7 and to_prior < 7, (to_truth, to_prior)
    np.testing.assert_allclose(data["rlnAngleTiltPrior"].to_numpy(np.float64), good[:, 1])  # kept in run_data.star

    poses, res_wrong, _ = refine_about(d, blocks, truth, wrong, "wrong")
    to_truth, to_prior = np.median(geodesic_deg(poses, truth)), np.median(geodesic_deg(poses, wrong))
    assert np.median(geodesic_deg(wrong, truth)) > 25
    # held by the prior (the search reaches 3σ in direction and in psi: at most ~3√2σ), away from the truth
    assert to_truth > 18 and to_prior < 3 * np.sqrt(2) * SIGMA, (to_truth, to_prior)
    assert res_wrong > res_good


def test_schedule_widths_follow_relion():
    """RELION: --sigma_ang wins over --sigma_rot/tilt/psi; either starts local searches (refine and classify share
    initial_schedule); the schedule's own switch to local searches gives all three one σ (updateAngularSampling);
    the widths survive a checkpoint (JSON turns the tuple into a list)."""
    ctx = SimpleNamespace(box=32, angpix=6.0, cfg=RefineConfig("p", "o", "r", sigma_rot=4.0, sigma_psi=2.0))
    sch = initial_schedule(ctx)
    assert sch.local_search and sch.local_sigmas_deg == (4.0, 0.0, 2.0)
    ctx.cfg = RefineConfig("p", "o", "r", sigma_ang=5.0, sigma_rot=4.0, sigma_psi=2.0)
    assert initial_schedule(ctx).local_sigmas_deg == (5.0, 5.0, 5.0)
    ctx.cfg = RefineConfig("p", "o", "r")
    assert not initial_schedule(ctx).local_search and initial_schedule(ctx).local_sigmas_deg == (0.0, 0.0, 0.0)

    again = Schedule(**json.loads(json.dumps(sch.__dict__)))
    assert again.local_sigmas_deg == (4.0, 0.0, 2.0)
    again.iter_without_resolution_gain = again.iter_without_large_changes = 5  # stalled: the sampling gets finer
    assert again.update_angular_sampling(0.1, 3, 1.0, 1.0) is not None and again.healpix_order == 3
    assert again.local_sigmas_deg == (7.5, 7.5, 7.5)  # 2 × the new fine step, for all three angles
