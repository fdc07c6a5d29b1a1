"""reconstruction/fsc.phase_randomised, the step of relion_postprocess's correction that tests/relion cannot pin down
(RELION's random phases are not ours): amplitudes kept everywhere, phases kept inside the shell and lost outside it."""

import torch

from cryorefine.reconstruction.fsc import fsc_curve, phase_randomised


def test_phases_randomised_past_the_shell_only():
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(32, 32, 32, generator=g, dtype=torch.float64)
    out = phase_randomised(vol, 6, torch.Generator().manual_seed(1))
    fsc = fsc_curve(vol, out)
    assert torch.allclose(fsc[:6], torch.ones(6, dtype=torch.float64), atol=1e-9)  # shells 0..5 untouched
    assert fsc[8:].abs().max() < 0.15 and abs(float(fsc[8:].mean())) < 0.05  # shells from 8 on: uncorrelated
    # every amplitude kept (the x = 0 plane's pairs are made Hermitian again by the inverse transform: compare the rest)
    a, b = torch.fft.rfftn(vol).abs()[..., 1:16], torch.fft.rfftn(out).abs()[..., 1:16]
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
