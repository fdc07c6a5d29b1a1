"""TileSums.add_to: a tile's slices reach its classes' back-projectors, told how much memory is spare."""

import torch

from cryorefine.estep import sums as sums_module
from cryorefine.estep.sums import TileSums, WeightedSums
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.projection.insert import BackProjector


def _tile(box: int):
    torch.manual_seed(0)
    s = WeightedSums.zeros(2, box, 2, 1, 4)
    r = 5
    rot = euler_to_matrix(torch.rand(r) * 360, torch.rand(r) * 180, torch.rand(r) * 360)
    ky, kx = torch.meshgrid(torch.arange(-3, 4.0), torch.arange(0, 4.0), indexing="ij")
    ky, kx = ky.flatten(), kx.flatten()
    tile = TileSums.zeros(s, rot, torch.tensor([1, 0, 1, 1, 0]), kx.numel(), torch.complex64)
    tile.values = torch.randn(r, kx.numel(), dtype=torch.complex64)
    tile.weights = torch.rand(r, kx.numel())
    tile.mass = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0])  # rotation 2 has no weight: not inserted
    return s, tile, ky, kx


def test_add_to_inserts_each_class_and_passes_the_spare_memory(monkeypatch):
    box = 8
    s, tile, ky, kx = _tile(box)
    seen = []
    insert = BackProjector.insert

    def spy(self, rotations, ky_, kx_, values, weights, spare_bytes=0):
        seen.append((rotations.shape[0], spare_bytes))
        insert(self, rotations, ky_, kx_, values, weights, spare_bytes)

    monkeypatch.setattr(sums_module, "available_bytes", lambda device: 123 << 20)
    monkeypatch.setattr(BackProjector, "insert", spy)
    tile.add_to(s, ky, kx)
    assert seen == [(2, 123 << 20), (2, 123 << 20)]  # class 0: rotations 1, 4; class 1: 0, 3 (2 has no mass)
    for k, rows in ((0, [1, 4]), (1, [0, 3])):
        ref = BackProjector.zeros(box, 2)
        insert(ref, tile.rotations[rows], ky, kx, tile.values[rows], tile.weights[rows])
        assert torch.equal(s.backprojectors[k].data, ref.data) and torch.equal(s.backprojectors[k].weight, ref.weight)
