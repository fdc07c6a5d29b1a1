"""The start of a run: the start map's spectrum (RELION's getSpectrum) against numpy, and the start's transforms done on
the run's device with the host as the fallback when the device has no room."""

from functools import partial

import numpy as np
import pytest
import torch

from cryorefine.fourier.filters import low_pass_filter
from cryorefine.mstep.statistics import map_shell_power
from cryorefine.refine.auto_refine import on_device_or_host


def test_map_shell_power_is_the_mean_power_per_shell_of_the_half_transform():
    d = 12
    vol = np.random.default_rng(3).standard_normal((d, d, d))
    f = np.fft.rfftn(vol)  # the phase origin does not change |F|
    kz, ky, kx = np.meshgrid(np.fft.fftfreq(d, 1 / d), np.fft.fftfreq(d, 1 / d), np.arange(d // 2 + 1), indexing="ij")
    shell = np.round(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int)
    expected = np.zeros(d // 2 + 1)
    for s in range(d // 2 + 1):
        expected[s] = np.mean(np.abs(f[shell == s]) ** 2)
    got = map_shell_power(torch.from_numpy(vol).float())
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_on_device_or_host_falls_back_to_the_host_when_the_device_is_full():
    seen = []

    def doubled(x):
        seen.append(x.device.type)
        if x.device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("no room")
        return 2 * x

    x = torch.arange(4.0)
    out = on_device_or_host(doubled, x, torch.device("meta"))  # a device that "runs out of memory"
    assert seen == ["meta", "cpu"] and out.device.type == "cpu" and torch.equal(out, 2 * x)
    seen.clear()
    assert torch.equal(on_device_or_host(doubled, x, "cpu"), 2 * x) and seen == ["cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_start_transforms_match_the_host():
    vol = torch.from_numpy(np.random.default_rng(4).standard_normal((40, 40, 40)))
    lowpass = partial(low_pass_filter, resolution_angst=20.0, angpix=2.0)
    on_gpu = on_device_or_host(lowpass, vol, "cuda")
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, lowpass(vol), rtol=0.0, atol=1e-12 * float(vol.abs().max()))
    torch.testing.assert_close(
        on_device_or_host(map_shell_power, vol, "cuda"), map_shell_power(vol), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("command", ["refine", "classify"])
def test_the_particles_star_file_is_read_once(tmp_path, monkeypatch, command):
    """validate.py's checks read the particles; the run takes that table rather than parsing the file again (a
    35,645-particle STAR file takes ~0.5 s to parse)."""
    from cryorefine.cli.main import main
    from cryorefine.io import particles
    from small_set import small_run_flags, small_set

    d = small_set(tmp_path / "data", 32, 6.0, 20, seed=2)
    reads, read_star = [], particles.read_star

    def counted(path):
        reads.append(str(path))
        return read_star(path)

    monkeypatch.setattr(particles, "read_star", counted)
    more = ["--iter", "1", "--K", "2"] if command == "classify" else ["--max_seconds", "0.01"]
    assert main([command, *small_run_flags(d, tmp_path / "out"), *more]) == 0
    assert reads.count(str(d / "particles_noposes.star")) == 1, reads
    # the default precision (tf32) as the CPU runs it
    assert "coarse products in fp32" in (tmp_path / "out" / "run.log").read_text()
