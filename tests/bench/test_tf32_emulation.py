"""bench/tf32_emulation.py's rounding to TF32 against an independent one: numpy's frexp and round-half-to-even on the
11 significant bits TF32 keeps (1 implicit + 10 explicit)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("tf32_emulation", REPO / "bench" / "tf32_emulation.py")
emu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emu)


def test_rounding_to_tf32_matches_frexp_and_half_even():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-30, 30, (100_000,), generator=g).float())
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), -(1 + 3 * 2**-11), 0.0, -0.0])
    x = torch.cat([x, ties])
    m, e = np.frexp(x.double().numpy())  # |m| in [0.5, 1): 11 significant bits are m·2^11
    expect = np.ldexp(np.round(m * 2.0**11) / 2.0**11, e)
    got = emu.to_tf32(x).double().numpy()
    assert np.array_equal(got, expect)
    assert got[-6:-2].tolist() == [1.0, 1 + 2**-9, -1.0, -(1 + 2**-9)]  # ties to even
