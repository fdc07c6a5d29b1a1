"""Half sets from rlnRandomSubset as RELION takes them (exp_model.cpp): kept when every particle has 1 or 2, drawn anew
when the column is absent or all 0, and a column that mixes 1/2 with other values stops the run."""

from types import SimpleNamespace

import numpy as np
import pytest

from cryorefine.errors import CryoInputError
from cryorefine.refine.auto_refine import halves_of


class Table(SimpleNamespace):
    def __len__(self):
        return len(self.random_subset)


def test_given_halves_are_kept():
    t = Table(random_subset=np.array([2, 1, 1, 2, 2]), star_path="p.star")
    assert halves_of(t, 0).tolist() == [2, 1, 1, 2, 2]


def test_absent_halves_are_drawn_equal():
    t = Table(random_subset=np.zeros(10, dtype=np.int64), star_path="p.star")
    h = halves_of(t, 3)
    assert sorted(np.bincount(h)[1:].tolist()) == [5, 5]


def test_mixed_halves_stop_the_run():
    t = Table(random_subset=np.array([1, 2, 0, 1]), star_path="p.star")
    with pytest.raises(CryoInputError, match="rlnRandomSubset"):
        halves_of(t, 0)
