"""An independent float64 reference of the E-step, pixel by pixel, against the production path (float32).

The reference computes diff2 = Σ_j |X̃_j(t) − s C_j P_j|² / (2σ²_j) directly (elementwise difference, sum over
pixels; no expansion into cross terms and no matrix products over poses), for every coarse sample, then the
significant set (smallest set holding ``adaptive_fraction`` of the coarse posterior), then every fine child
(4 translations × 8 rotations) of each significant coarse sample at the full window; projections are zero and nothing
is back-projected beyond each pass's radius (RELION's r_max), while σ² and the scores count every rounded shell. It
shares with production only its inputs: the ImageBatch (masked/unmasked pixels, CTF, 1/σ², scale, previous offsets), the
Window, the PoseGrid's angles and translations, and central slices of a float64 padded transform (not under test).

Checked: best pose (class, fine Euler angles, offsets), rlnMaxValueProbDistribution, n_significant, the
log-likelihood log Σ exp(−diff2 + log priors) (the offset prior of each fine sample is its coarse translation's, as
RELION's convertAllSquaredDifferencesToWeights), the back-projected data/weights of the weighted sums (unmasked image)
and the noise and scale statistics (masked image, as RELION).
A negative control (image moved by −offset in the reference) must change the best poses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryorefine.estep.expectation import expectation_batch
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.images import Window, prepare_batch
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.sums import WeightedSums
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.healpix import make_sampling
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.projection.extract import extract_central_slices, prepare_padded_transform
from cryorefine.projection.insert import BackProjector
from cryorefine.simulate import simulate_particles

BOX = 24
ANGPIX = 3.0
PAD = 2
N_PART = 6
MAX_SHELL = 10  # fine window
COARSE_SHELL = 6  # coarse window (a prefix of the fine one)
SIGMA2_OFFSET = 30.0  # Å², Gaussian prior on the absolute offset
FRACTION = 0.999
SNR = 0.3  # signal-to-noise ratio of the simulated images
NOISE_TEMPER = 1.0  # σ² = TEMPER × (white noise power) ; > 1 flattens posteriors

MAXPROB_TOL = 1e-3  # absolute, rlnMaxValueProbDistribution
LOGLIK_TOL = 2e-3  # absolute, on log-likelihoods of magnitude ~1e2 (float32 accumulations)
SUMS_RTOL = 1e-3  # relative (Frobenius) error of the back-projected data and weights


# ----------------------------------------------------------------------------- data


def _blob_map(box: int, seed: int = 3) -> torch.Tensor:
    """An asymmetric blob of Gaussians (z, y, x), float64."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for _ in range(7):
        centre = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 10.0
        width = 1.2 + 1.3 * float(torch.rand(1, generator=g, dtype=torch.float64))
        amp = 0.5 + float(torch.rand(1, generator=g, dtype=torch.float64))
        r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        vol += amp * torch.exp(-r2 / (2 * width**2))
    return vol


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("estep_ref")
    truth = _blob_map(BOX)
    info = simulate_particles(
        truth.float(),
        ANGPIX,
        out,
        N_PART,
        snr=SNR,
        defocus_min_angst=6000.0,
        defocus_max_angst=14000.0,
        max_shift_angst=4.0,
        seed=11,
    )
    table = load_particles(out / "particles.star")
    true_eulers = np.stack([table.rot_deg, table.tilt_deg, table.psi_deg], -1).copy()
    true_origin = np.stack([table.origin_x_angst, table.origin_y_angst], -1).copy()
    # previous offsets: the truth off by up to ±1 px, so the old offset and the search both matter
    rng = np.random.default_rng(5)
    table.origin_x_angst[:] = true_origin[:, 0] + rng.uniform(-1, 1, N_PART) * ANGPIX
    table.origin_y_angst[:] = true_origin[:, 1] + rng.uniform(-1, 1, N_PART) * ANGPIX
    vol = truth / info["noise_sigma"]  # the particles' greyscale
    window = Window.build(BOX, MAX_SHELL)
    sigma2 = torch.full((1, BOX // 2 + 1), NOISE_TEMPER * BOX * BOX / 2.0, dtype=torch.float64)  # per component
    scale = torch.tensor([1.1])
    gen = torch.Generator().manual_seed(1)
    batch = prepare_batch(table, np.arange(N_PART), window, sigma2, scale, 60.0, ANGPIX, True, True, gen, None)
    return dict(
        table=table,
        window=window,
        batch=batch,
        true_eulers=true_eulers,
        ref32=prepare_padded_transform(vol.float(), PAD),
        ref64=prepare_padded_transform(vol, PAD),
    )


# ----------------------------------------------------------------------------- reference (float64, pixel by pixel)


def _moved(x: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, off: torch.Tensor, sign: float) -> torch.Tensor:
    """x (J,) moved by sign·off (..., 2) px (x, y): X(k)·exp(−2πi k·(sign·off)/d) -> (..., J)."""
    ph = (-2.0 * math.pi * sign / BOX) * (off[..., 0:1] * kx + off[..., 1:2] * ky)
    return x * torch.complex(torch.cos(ph), torch.sin(ph))


def _diff2(xt: torch.Tensor, sc: torch.Tensor, proj: torch.Tensor, inv_s2: torch.Tensor) -> torch.Tensor:
    """Σ_j |xt_j − sc_j·proj_j|² · inv_s2_j / 2, elementwise then summed over j: xt (T, J), proj (R, J) -> (T, R)."""
    out = torch.empty(xt.shape[0], proj.shape[0], dtype=torch.float64)
    model = sc * proj  # (R, J)
    for t in range(xt.shape[0]):
        d = xt[t][None, :] - model
        out[t] = ((d.real**2 + d.imag**2) * (0.5 * inv_s2)).sum(-1)
    return out


def _trans_prior(off_px: torch.Tensor) -> torch.Tensor:
    return -((off_px * ANGPIX) ** 2).sum(-1) / (2.0 * SIGMA2_OFFSET)


def reference_estep(d, grid: PoseGrid, local=None, sign: float = 1.0, with_sums: bool = False):
    """Per particle: coarse pass, significance, fine pass; returns dict of per-particle results (+ back-projector)."""
    b, win, ref = d["batch"], d["window"], d["ref64"]
    ky, kx = win.ky.double(), win.kx.double()
    # RELION's Mresol_fine: the kx = 0, ky < 0 half column (the conjugates of ky > 0) is neither scored nor counted in
    # the noise and scale statistics; the back-projection takes every pixel
    scored = ((kx != 0) | (ky >= 0)).double()
    # RELION's Projector and BackProjector stop at the radius of the pass's image size (r_max): between that circle
    # and the last rounded shell the projection is zero (the image's power still counts) and nothing is inserted
    in_fine = (kx**2 + ky**2 <= MAX_SHELL**2).double()
    J = win.size
    jc = win.prefix(COARSE_SHELL)
    trans = grid.translations_px.double()  # (T, 2) relative
    children = grid.translation_children_px.double()  # (4, 2)
    # rotations in float64 from the grid's own Euler angles (the same sampling as production's)
    rot_c = euler_to_matrix(*(torch.as_tensor(grid.coarse_eulers_deg[:, i], dtype=torch.float64) for i in range(3)))
    bp = BackProjector.zeros(BOX, PAD, dtype=torch.float64) if with_sums else None
    S = BOX // 2 + 1
    shell = win.shell.clamp(max=S - 1)
    stats = {k: torch.zeros(S, dtype=torch.float64) for k in ("sigma2_noise", "scale_xa", "scale_aa")}
    dir_w = torch.zeros(grid.sampling.n_directions, dtype=torch.float64)
    off_sq = 0.0
    res = {k: [] for k in ("eulers", "offsets", "max_prob", "nsig", "loglik", "coarse_mass_gap")}
    for i in range(len(b)):
        xm = b.f_masked[i].to(torch.complex128)
        xu = b.f_unmasked[i].to(torch.complex128)
        ctf, inv_s2 = b.ctf[i].double(), b.inv_sigma2[i].double()
        w_s2 = inv_s2 * scored  # in the scores
        s = float(b.scale[i])
        sc = s * ctf
        old = b.old_offset_px[i].double()
        if local is None:
            ids = np.arange(grid.n_rotations)
            rprior = torch.zeros(len(ids), dtype=torch.float64)
        else:
            valid = local[2][i].cpu().numpy()
            ids = local[0][i].cpu().numpy()[valid]
            rprior = local[1][i].double()[torch.as_tensor(valid)]
        # ---- coarse pass at the coarse window
        in_coarse = (kx[:jc] ** 2 + ky[:jc] ** 2 <= COARSE_SHELL**2).double()
        proj_c = extract_central_slices(ref, rot_c[torch.as_tensor(ids)], ky[:jc], kx[:jc]) * in_coarse  # (L, jc)
        off_c = old[None, :] + trans  # (T, 2) absolute
        xt = _moved(xm[:jc], ky[:jc], kx[:jc], off_c, sign)
        logp = -_diff2(xt, sc[:jc], proj_c, w_s2[:jc]) + _trans_prior(off_c)[:, None] + rprior[None, :]  # (T, L)
        flat = logp.reshape(-1)
        p = torch.softmax(flat, 0)
        sp, order = torch.sort(p, descending=True)
        csum = torch.cumsum(sp, 0)
        nsig = int(torch.nonzero(csum >= FRACTION)[0, 0]) + 1 if bool((csum >= FRACTION).any()) else len(sp)
        # distance of the boundary from the fraction (a tie-breaking diagnostic)
        res["coarse_mass_gap"].append(
            float(min(abs(csum[nsig - 1] - FRACTION), abs(csum[nsig - 2] - FRACTION) if nsig > 1 else 1.0))
        )
        sig = order[:nsig]
        # ---- fine pass at the full window: 4 translations × 8 rotations per significant coarse sample
        lg, meta, meta_ids = [], [], []
        for f in sig.tolist():
            t, slot = divmod(f, len(ids))
            c = int(ids[slot])
            e = grid.fine_eulers_deg(np.array([c]))[0]  # (8, 3)
            rot_f = euler_to_matrix(*(torch.as_tensor(e[:, k]) for k in range(3)))
            proj_f = extract_central_slices(ref, rot_f, ky, kx) * in_fine  # (8, J)
            off_f = old[None, :] + trans[t][None, :] + children  # (4, 2)
            xf = _moved(xm, ky, kx, off_f, sign)
            # RELION: the offset prior of the coarse translation, shared by its four fine children
            lg.append(
                -_diff2(xf, sc, proj_f, w_s2)
                + _trans_prior((old + trans[t])[None, :]).expand(4)[:, None]
                + rprior[slot]
            )  # (4, 8)
            meta.append((e, off_f, rot_f, proj_f))
            meta_ids.append(c)
        lg_all = torch.stack(lg)  # (nsig, 4, 8)
        lse = torch.logsumexp(lg_all.reshape(-1), 0)
        best = int(lg_all.reshape(-1).argmax())
        q, rem = divmod(best, 32)
        tt, rr = divmod(rem, 8)
        res["eulers"].append(meta[q][0][rr])
        res["offsets"].append(meta[q][1][tt].numpy())
        res["max_prob"].append(float(torch.exp(lg_all.reshape(-1)[best] - lse)))
        res["nsig"].append(nsig)
        res["loglik"].append(float(lse))
        if with_sums:
            # one inserted slice per fine sample (no aggregation over translations or particles):
            # Γ·s·C·X̃_unmasked(t)/σ² with weight Γ·s²·C²/σ², at the sample's rotation
            gam = torch.exp(lg_all - lse)  # (nsig, 4, 8)
            rots, vals, wts = [], [], []
            for q, (e, off_f, rot_f, proj_f) in enumerate(meta):
                xuf = _moved(xu, ky, kx, off_f, sign)  # (4, J) unmasked, moved
                g = gam[q][:, :, None]  # (4, 8, 1): Γ of each fine sample
                rots.append(rot_f[None].expand(4, 8, 3, 3).reshape(32, 3, 3))
                vals.append((g * (in_fine * sc * inv_s2 * xuf)[:, None, :]).reshape(32, J))
                wts.append((g * (in_fine * sc * sc * inv_s2)).expand(4, 8, J).reshape(32, J))
                # the noise and scale statistics from the masked image (RELION's storeWeightedSums)
                xmf = _moved(xm, ky, kx, off_f, sign)
                r = xmf[:, None, :] - sc * proj_f[None, :, :]  # (4, 8, J) residual of every fine sample
                stats["sigma2_noise"].index_add_(0, shell, (g * (r.real**2 + r.imag**2)).sum((0, 1)) * scored)
                stats["scale_xa"].index_add_(
                    0, shell, (g * ctf * (xmf[:, None, :] * proj_f[None].conj()).real).sum((0, 1)) * scored
                )
                stats["scale_aa"].index_add_(
                    0, shell, (g * ctf**2 * (proj_f.real**2 + proj_f.imag**2)[None]).sum((0, 1)) * scored
                )
                off_sq += float((gam[q].sum(1) * ((off_f * ANGPIX) ** 2).sum(-1)).sum())
                c = meta_ids[q]
                dir_w[c // grid.sampling.n_psi] += float(gam[q].sum())
            bp.insert(torch.cat(rots), ky, kx, torch.cat(vals), torch.cat(wts))
    if with_sums:
        power, count = _power_beyond_window(d)
        stats["sigma2_noise"] += power
        stats["sigma2_count"] = count + torch.bincount(win.shell[scored > 0], minlength=S).double() * len(b)
    out = {k: np.asarray(v) for k, v in res.items()}
    out["bp"] = bp
    out.update(stats, direction_weight=dir_w, offset_sq_angst2=off_sq)
    return out


# ----------------------------------------------------------------------------- helpers


def _power_beyond_window(d) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION's storeWeightedSums beyond the window: each image's own power per shell (MAX_SHELL, BOX/2], of the image
    masked as the E-step masks it (--zero_mask: a raised cosine over 5 px from radius 10 px to the mean of the region
    outside), the kx = 0, ky < 0 half column left out; and the number of pixel terms."""
    imgs = torch.from_numpy(read_images(d["table"], np.arange(N_PART))).double()
    c = BOX // 2
    yy, xx = torch.meshgrid(
        torch.arange(BOX, dtype=torch.float64) - c, torch.arange(BOX, dtype=torch.float64) - c, indexing="ij"
    )
    r = torch.sqrt(yy**2 + xx**2)
    radius, edge = 10.0, 5.0
    w = torch.where(
        r < radius, 0.0, torch.where(r > radius + edge, 1.0, 0.5 - 0.5 * torch.cos(math.pi * (r - radius) / edge))
    )
    bg = (imgs * w).sum((1, 2), keepdim=True) / w.sum()
    f = torch.fft.rfft2(torch.fft.ifftshift(imgs * (1 - w) + bg * w, dim=(-2, -1)))
    ky = torch.fft.fftfreq(BOX, 1.0 / BOX, dtype=torch.float64)[:, None].expand(BOX, c + 1)
    kx = torch.arange(c + 1, dtype=torch.float64)[None, :].expand(BOX, c + 1)
    shell = torch.round(torch.sqrt(ky**2 + kx**2)).long()
    keep = (shell > MAX_SHELL) & (shell <= c) & ((kx != 0) | (ky >= 0))
    power = torch.zeros(c + 1, dtype=torch.float64).index_add_(0, shell[keep], (f.abs() ** 2)[:, keep].sum(0))
    count = torch.zeros(c + 1, dtype=torch.float64).index_add_(
        0, shell[keep], torch.full((int(keep.sum()),), float(N_PART), dtype=torch.float64)
    )
    return power, count


def _run_production(d, grid, local=None):
    settings = EStepSettings(
        adaptive_fraction=FRACTION,
        sigma2_offset_angst2=SIGMA2_OFFSET,
        angpix=ANGPIX,
        local_sigma_deg=0.0 if local is None else 1.0,
    )
    sums = WeightedSums.zeros(1, BOX, PAD, 1, grid.sampling.n_directions)
    res = expectation_batch(
        d["batch"], d["window"], COARSE_SHELL, [d["ref32"]], grid, settings, sums, local_prior=local
    )
    return res, sums


def _angle_between_deg(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    A = euler_to_matrix(*(torch.as_tensor(e1[:, k]) for k in range(3)))
    B = euler_to_matrix(*(torch.as_tensor(e2[:, k]) for k in range(3)))
    tr = (A * B).sum((-2, -1))
    return torch.rad2deg(torch.acos(((tr - 1) / 2).clamp(-1, 1))).numpy()


def _same_poses(prod, ref, grid) -> np.ndarray:
    """Per particle: same fine rotation (angle < 1e-3°) and same offset (1e-4 px)."""
    ang = _angle_between_deg(grid.best_eulers_deg(prod.fine_pose.numpy()), ref["eulers"])
    doff = np.abs(prod.offsets_px.double().numpy() - ref["offsets"]).max(1)
    return (ang < 1e-3) & (doff < 1e-4)


def _compare(d, grid, local, label):
    prod, sums = _run_production(d, grid, local)
    ref = reference_estep(d, grid, local, with_sums=True)
    same = _same_poses(prod, ref, grid)
    dmp = np.abs(prod.max_prob.double().numpy() - ref["max_prob"])
    dll = np.abs(prod.loglik.double().numpy() - ref["loglik"])
    nsig_p = prod.n_significant.numpy()
    bp = sums.backprojectors[0]
    rel_data = float(
        torch.linalg.vector_norm(bp.data.to(torch.complex128) - ref["bp"].data)
        / torch.linalg.vector_norm(ref["bp"].data)
    )
    rel_w = float(
        torch.linalg.vector_norm(bp.weight.double() - ref["bp"].weight) / torch.linalg.vector_norm(ref["bp"].weight)
    )
    print(
        f"\n[{label}] nsig prod={nsig_p.tolist()} ref={ref['nsig'].tolist()}"
        f"\n[{label}] max_prob ref={np.round(ref['max_prob'], 4).tolist()} max|Δ|={dmp.max():.2e}"
        f"\n[{label}] loglik ref={np.round(ref['loglik'], 3).tolist()} max|Δ|={dll.max():.2e}"
        f"\n[{label}] same pose: {same.tolist()}  sums rel err data={rel_data:.2e} weight={rel_w:.2e}"
        f"\n[{label}] coarse boundary gap to fraction: {np.round(ref['coarse_mass_gap'], 6).tolist()}"
    )
    assert ref["nsig"].max() > 1, "posteriors are one-hot: the case does not exercise the significance"
    assert ref["max_prob"].min() < 0.99
    assert (prod.class_index.numpy() == 0).all()
    assert same.all(), f"best poses differ for particles {np.flatnonzero(~same).tolist()}"
    np.testing.assert_array_equal(nsig_p, ref["nsig"])
    assert dmp.max() < MAXPROB_TOL
    assert dll.max() < LOGLIK_TOL
    assert rel_data < SUMS_RTOL
    assert rel_w < SUMS_RTOL
    # the M-step statistics accumulated alongside (same fine posteriors)
    other = {
        "sigma2_noise": (sums.sigma2_noise[0], ref["sigma2_noise"]),
        "scale_xa": (sums.scale_xa[0], ref["scale_xa"]),
        "scale_aa": (sums.scale_aa[0], ref["scale_aa"]),
        "direction_weight": (sums.direction_weight[0], ref["direction_weight"]),
        "offset_sq_angst2": (sums.offset_sq_angst2.reshape(1), torch.tensor([ref["offset_sq_angst2"]])),
    }
    errs = {
        k: float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b)) for k, (a, b) in other.items()
    }
    print(f"[{label}] M-step statistics rel err: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    for k, v in errs.items():
        assert v < SUMS_RTOL, k
    # RELION stores a particle's significant fine samples only (at least FRACTION of its mass), not renormalised
    assert N_PART * FRACTION - 1e-4 < float(sums.class_weight[0]) < N_PART + 1e-4
    assert 2 * N_PART * FRACTION - 1e-4 < float(sums.offset_weight) < 2 * N_PART + 1e-4
    assert torch.equal(sums.sigma2_count[0], ref["sigma2_count"])
    return prod


def _negative_control(d, grid, local, prod, label):
    bad = reference_estep(d, grid, local, sign=-1.0)
    same = _same_poses(prod, bad, grid)
    print(f"[{label}] negative control (−offset): same pose {same.tolist()}")
    assert not same.all(), "moving the image by −offset in the reference did not change the best poses"


# ----------------------------------------------------------------------------- tests


def test_global_search_matches_reference(data):
    sampling = make_sampling(1, "C1", random_perturbation=0.13)
    grid = PoseGrid.build(sampling, offset_range_px=1.5, offset_step_px=1.0)
    prod = _compare(data, grid, None, "global")
    _negative_control(data, grid, None, prod, "global")


def test_local_search_matches_reference(data):
    sampling = make_sampling(2, "C1", random_perturbation=-0.21)
    grid = PoseGrid.build(sampling, offset_range_px=1.5, offset_step_px=1.0)
    rng = np.random.default_rng(7)
    prev = data["true_eulers"] + rng.normal(0.0, 8.0, data["true_eulers"].shape)
    sigma = 2.0 * sampling.angular_step_deg  # 15° steps, σ = 30°, candidates within 2σ
    local = grid.local_candidates(prev[:, 0], prev[:, 1], prev[:, 2], sigma, sigma_cutoff=2.0)
    assert local[0].shape[1] < grid.n_rotations // 2  # a real restriction of the search
    print(f"\n[local] candidates per particle: {local[2].sum(1).tolist()} of {grid.n_rotations}")
    prod = _compare(data, grid, local, "local")
    _negative_control(data, grid, local, prod, "local")
