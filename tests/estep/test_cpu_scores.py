"""The CPU's compiled local-search products (estep/cpu_scores.py) against gathered rows and matrix products, in
float64 and float32."""

from __future__ import annotations

import pytest
import torch

from cryorefine.estep.cpu_scores import local_products


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_local_products_equal_gathered_products(dtype, tol):
    g = torch.Generator().manual_seed(4)
    U, jc, n, L, T = 40, 30, 6, 9, 5
    rows = torch.randn(U, 2 * jc, generator=g, dtype=dtype)
    power = torch.rand(U, jc, generator=g, dtype=dtype)
    idx = torch.randint(0, U, (n, L), generator=g)
    a = torch.randn(n, T, 2 * jc, generator=g, dtype=dtype)
    b = torch.rand(n, jc, generator=g, dtype=dtype)
    cross, third = local_products(rows, power, idx, a, b)
    torch.testing.assert_close(cross, torch.einsum("ntj,nlj->ntl", a, rows[idx]), rtol=0, atol=tol)
    torch.testing.assert_close(third, torch.einsum("nj,nlj->nl", b, power[idx]), rtol=0, atol=tol)
    assert cross.abs().max() > 1.0
