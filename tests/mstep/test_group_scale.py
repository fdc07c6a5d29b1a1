"""--scale per micrograph group, RELION's rule (maximizationOtherParameters and storeWeightedSums of 3.1 and 5.0),
against float64 references written out from RELION's loops on synthetic sums: the shells each sample's class takes
(data_vs_prior > 3), the old scale in the model divided out again, the clamp to [median/5, 5·median] and the mean
weighted by the groups' particles."""

import numpy as np
import torch

from cryorefine.estep.images import Window
from cryorefine.estep.store import real_bmm, scale_products
from cryorefine.estep.sums import ScaleShells, WeightedSums
from cryorefine.mstep.statistics import GroupScales, ModelStatistics, updated_statistics

BOX = 16


def relion_scales(xa: list[float], aa: list[float], nr_particles: list[int]) -> list[float]:
    """RELION's loop over the groups, as written in maximizationOtherParameters (mu = 0: no SGD)."""
    scale = [xa[g] / aa[g] if aa[g] > 0.0 else 1.0 for g in range(len(xa))]
    median = sorted(scale)[len(scale) // 2]
    total, parts = 0.0, 0.0
    for g in range(len(scale)):
        if scale[g] > 5.0 * median:
            scale[g] = 5.0 * median
        elif scale[g] < median / 5.0:
            scale[g] = median / 5.0
        total += nr_particles[g] * scale[g]
        parts += nr_particles[g]
    return [s / (total / parts) for s in scale]


def test_m_step_follows_relions_loop():
    rng = np.random.default_rng(4)
    G, S = 8, BOX // 2 + 1  # an even count: RELION's median is the upper of the middle two
    xa_shell = rng.uniform(0.5, 2.0, (G, S))
    aa_shell = rng.uniform(0.5, 2.0, (G, S))
    xa_shell[2] *= 40.0  # above 5·median: clamped
    xa_shell[5] *= 0.01  # below median/5
    aa_shell[6] = 0.0  # no selected shell (e.g. no particle in this half set): 1
    xa_shell[6] = 0.0
    particles = rng.integers(0, 30, G)
    sums = WeightedSums.zeros(1, BOX, 2, 1, 1, n_scale_groups=G)
    sums.scale_xa += torch.from_numpy(xa_shell)
    sums.scale_aa += torch.from_numpy(aa_shell)
    of_particle = np.repeat(np.arange(G), particles)
    scales = GroupScales.ones(of_particle, np.ones(len(of_particle), bool), G).with_value(torch.rand(G) + 0.5)
    old = ModelStatistics.initial(torch.ones(1, S), 1.0, scales, torch.zeros(1, S))
    new = updated_statistics(old, [sums], 0.0, noise=False, scale=True).scale.value
    ref = relion_scales(xa_shell.sum(1).tolist(), aa_shell.sum(1).tolist(), particles.tolist())
    np.testing.assert_allclose(new.numpy(), ref, rtol=1e-12)
    assert abs(float((new * torch.from_numpy(particles)).sum()) / particles.sum() - 1.0) < 1e-12
    kept = updated_statistics(old, [sums], 0.0, noise=False, scale=False).scale.value  # without --scale: unchanged
    assert torch.equal(kept, scales.value)


def test_e_step_takes_each_class_s_shells_as_relion():
    """store.py's products over the shells of each sample's class, against RELION's loop over the samples and pixels
    with the old scale s in Fctf (Frefctf = s·C·P), XA/s and AA/s² at the end."""
    g = torch.Generator().manual_seed(2)
    window = Window.build(BOX, 7)
    J, m, T4, R = window.size, 3, 2, 4
    slot_class = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    take = torch.zeros(2, BOX // 2 + 1, dtype=torch.bool)
    take[0, 1:5] = True  # class 0: shells 1-4; class 1: shells 1-2 and 6 (the classes differ at 3, 4 and 6)
    take[1, 1:3] = True
    take[1, 6] = True
    xm = torch.complex(torch.randn(m, T4, J, generator=g), torch.randn(m, T4, J, generator=g))
    pg = torch.complex(torch.randn(m, R, J, generator=g), torch.randn(m, R, J, generator=g))
    gam = torch.rand(m, T4, R, generator=g)
    gam /= gam.sum((1, 2), keepdim=True)
    ctf = torch.rand(m, J, generator=g) * 2 - 1
    s_old = torch.tensor([0.8, 1.3, 1.05])
    gsum = gam.sum(1)
    xq = (xm * real_bmm(gam, pg).conj()).real.sum(1)
    pp = torch.einsum("mr,mrj->mj", gsum, pg.abs() ** 2)
    xa, aa = scale_products(xq, pp, ScaleShells.of(take), window, xm, gam, gsum, pg, pg.abs() ** 2, slot_class)
    ours_xa, ours_aa = (ctf * xa).double().sum(1), (ctf**2 * aa).double().sum(1)

    ref_xa, ref_aa = np.zeros(m), np.zeros(m)
    shell = window.shell.numpy()
    x, p, c, w = xm.numpy().astype(np.complex128), pg.numpy().astype(np.complex128), ctf.double().numpy(), gam.numpy()
    for i in range(m):
        s = float(s_old[i])
        for t in range(T4):
            for r in range(R):
                k = int(slot_class[i, r])
                for j in range(J):
                    if not take[k, shell[j]]:  # RELION: data_vs_prior_class[k](ires) > 3
                        continue
                    frefctf = s * c[i, j] * p[i, r, j]
                    ref_xa[i] += w[i, t, r] * (frefctf.real * x[i, t, j].real + frefctf.imag * x[i, t, j].imag)
                    ref_aa[i] += w[i, t, r] * abs(frefctf) ** 2
        ref_xa[i] /= s
        ref_aa[i] /= s * s
    np.testing.assert_allclose(ours_xa.numpy(), ref_xa, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_aa.numpy(), ref_aa, rtol=1e-4, atol=1e-4)
    every = scale_products(xq, pp, None, window, xm, gam, gsum, pg, pg.abs() ** 2, slot_class)  # no selection
    assert float((ctf * every[1]).abs().sum()) > float((ctf * aa).abs().sum()) * 1.5
