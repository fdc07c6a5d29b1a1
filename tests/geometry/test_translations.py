import torch

from cryorefine.geometry.translations import child_translations, perturb_translations_px, translation_grid_px


def test_grid_rule_and_order():
    g = translation_grid_px(2.0, 1.0)
    assert g.shape == (13, 2)  # RELION log for --offset_range 2 --offset_step 1: NrTranslations= 13
    assert torch.equal(g[0], torch.tensor([-2.0, 0.0], dtype=torch.float64))
    # x-major (ix outer loop, iy inner), all multiples of the step inside the circle
    key = g[:, 0] * 100 + g[:, 1]
    assert torch.equal(key, torch.sort(key).values)
    brute = {(x, y) for x in range(-3, 4) for y in range(-3, 4) if x * x + y * y <= 4}
    assert {tuple(map(float, p)) for p in g.tolist()} == {(float(x), float(y)) for x, y in brute}
    assert translation_grid_px(0.0, 1.5).tolist() == [[0.0, 0.0]]
    g = translation_grid_px(5.0, 1.5)
    assert ((g / 1.5 - torch.round(g / 1.5)).abs() < 1e-12).all()
    assert ((g**2).sum(1) <= 25.0 + 1e-9).all()
    assert len(translation_grid_px(6.0, 2.0)) == 29  # circle r=3 in steps: 29 lattice points


def test_children_and_perturbation():
    c = child_translations(2.0)
    assert c.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    assert len(child_translations(2.0, oversampling=2)) == 16
    assert translation_grid_px(2.0, 1.0, dtype=torch.float32).dtype == torch.float32
    assert perturb_translations_px(torch.zeros(1, 2), 0.25, 2.0).tolist() == [[0.5, 0.5]]
