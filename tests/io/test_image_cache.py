"""The GPU's particle-image cache against the stacks themselves: every pass gives the images read_images gives, an
image kept is not read again, images past the capacity are read every pass, and a refinement with the cache
(forced on the CPU here) writes the same files as one without."""

import numpy as np
import pytest
import torch

import cryorefine.io.image_cache as image_cache
import cryorefine.refine.context as run_context
from cryorefine.io.image_cache import ImageCache
from cryorefine.io.mrc import read_map
from cryorefine.io.particles import load_particles
from cryorefine.io.table import read_images
from cryorefine.io.star import read_star
from cryorefine.refine.auto_refine import refine
from cryorefine.refine.config import RefineConfig
from small_set import small_set

BOX, ANGPIX, N = 24, 6.0, 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_set(tmp_path_factory.mktemp("cache"), BOX, ANGPIX, N, seed=2)


def _counting_reads(monkeypatch):
    reads = []

    def counted(table, rows, out=None):
        reads.extend(np.asarray(rows).tolist())
        return read_images(table, rows, out=out)

    monkeypatch.setattr(image_cache, "read_images", counted)
    return reads


@pytest.mark.parametrize("capacity, slot_box", [(0, BOX), (13, BOX), (N, BOX), (13, BOX + 6)])
def test_each_pass_gives_the_stack_images_and_kept_ones_are_not_read_again(data, monkeypatch, capacity, slot_box):
    """A slot larger than the images (a larger optics group's box) gives them back as they were."""
    table = load_particles(data / "particles.star")
    truth = read_images(table, np.arange(N))
    reads = _counting_reads(monkeypatch)
    cache = ImageCache(N, slot_box, capacity, "cpu")
    rng = np.random.default_rng(0)
    for p in range(3):
        rows = rng.permutation(N)
        reads.clear()
        for batch in np.array_split(rows, 5):  # batches mixing kept and unkept images
            got = cache.images(batch, cache.load(table, batch), BOX)
            np.testing.assert_array_equal(got.numpy(), truth[batch])
        expected = N if p == 0 else N - capacity
        assert len(reads) == expected, f"pass {p}: {len(reads)} images read, expected {expected}"
    assert cache.used == capacity and (cache.slot >= 0).sum() == capacity


def _refine(d, out, batch, image_cache_on):
    cfg = RefineConfig(
        particles=str(d / "particles_noposes.star"),
        output_root=str(out / "run"),
        reference=str(d / "start.mrc"),
        ini_high=30.0,
        particle_diameter=130.0,
        ctf=True,
        flatten_solvent=True,
        norm=True,
        healpix_order=1,
        offset_range=2.0,
        offset_step=1.0,
        max_iter=2,
        random_seed=4,
        batch_size=batch,
        threads=1,
        low_resol_join_halves=0.0,
        image_cache=image_cache_on,
    )
    refine(cfg)


@pytest.mark.parametrize("capacity", [15, N])
def test_refinement_with_the_cache_writes_the_same_files(data, tmp_path, monkeypatch, capacity):
    """Capacity for 15 of the 40 images (the room the GPU would give, forced on the CPU), or for all: batches of 7 mix
    kept and read images; data.star and the maps must be those of a run that reads every image every iteration. The
    initial noise spectra read every image through the cache: the iterations read only the ones it did not keep."""
    monkeypatch.setattr(run_context, "image_cache_bytes", lambda device, fixed, sharing=1: capacity * 4 * BOX * BOX)
    _refine(data, tmp_path / "plain", 7, False)
    reads = _counting_reads(monkeypatch)
    _refine(data, tmp_path / "cached", 7, True)
    assert len(reads) == N + 2 * (N - capacity), "the start reads all; iterations 1 and 2 only the ones not kept"
    for name in ("run_it002_data.star",):
        a = read_star(tmp_path / "plain" / name)["particles"]
        b = read_star(tmp_path / "cached" / name)["particles"]
        assert a.equals(b)
    for name in ("run_it002_half1_class001.mrc", "run_it002_half2_class001.mrc"):
        np.testing.assert_array_equal(read_map(tmp_path / "plain" / name)[0], read_map(tmp_path / "cached" / name)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cache_gives_the_stack_images_and_its_room_follows_the_memory_cap(data, monkeypatch):
    from cryorefine.estep.memory import IMAGE_CACHE_FRACTION, image_cache_bytes

    table = load_particles(data / "particles.star")
    truth = read_images(table, np.arange(N))
    cache = ImageCache(N, BOX, 13, "cuda")
    for p in range(2):
        for batch in np.array_split(np.random.default_rng(p).permutation(N), 3):
            got = cache.images(batch, cache.load(table, batch), BOX)
            assert got.is_cuda
            np.testing.assert_array_equal(got.cpu().numpy(), truth[batch])
    total = torch.cuda.mem_get_info(0)[1]
    torch.cuda.set_per_process_memory_fraction(0.1, 0)
    try:
        room = image_cache_bytes("cuda", fixed_bytes=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert 0 < room <= IMAGE_CACHE_FRACTION * 0.1 * total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_initial_noise_spectra_read_through_the_cache_keep_the_images(data):
    """The start's σ² read through the GPU cache (pinned copies) equals σ² read from the stacks, and the cache then
    holds every image as the stack has it."""
    from functools import partial

    from cryorefine.mstep.noise import SpectrumReads, initial_sigma2

    table = load_particles(data / "particles.star")
    cache = ImageCache(N, BOX, N, "cuda")
    via_cache = initial_sigma2(table, 1, device="cuda", reads=SpectrumReads(partial(cache.load, table), cache.images))
    from_stacks = initial_sigma2(table, 1, device="cuda")
    torch.testing.assert_close(via_cache, from_stacks, rtol=1e-12, atol=0.0)
    assert cache.holds(np.arange(N))
    kept = cache.data[torch.as_tensor(cache.slot, device="cuda")].cpu().numpy()
    np.testing.assert_array_equal(kept, read_images(table, np.arange(N)))


def test_read_images_into_a_given_buffer(data):
    table = load_particles(data / "particles_noposes.star")
    rows = np.array([5, 6, 7, 30, 2, 2])
    into = np.full((len(rows), BOX, BOX), np.nan, np.float32)
    assert read_images(table, rows, out=into) is into and np.array_equal(into, read_images(table, rows))
    with pytest.raises(ValueError, match="does not take"):
        read_images(table, rows, out=into[:-1])
