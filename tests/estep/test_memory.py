"""Adaptive memory: the tile size model against measured peaks, the halving on running out of memory (same results as
an unsplit run), the fixed-volume check's message, and images read per batch with read-ahead.

The CPU peaks are measured by live_bytes.LiveBytes (every storage an aten op creates, until it is freed), not by
the model; the GPU tests use torch.cuda.max_memory_allocated and a per-process memory cap.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import cryorefine.estep.diff2 as diff2
import cryorefine.estep.expectation as expectation
import cryorefine.estep.slots as slots_module
import cryorefine.estep.weights as weights
import cryorefine.projection.extract as extract
import cryorefine.projection.insert as insert
from cryorefine.mstep.statistics import GroupScales
from cryorefine.cli.main import main as cli
from cryorefine.estep import memory
from cryorefine.estep.expectation import expectation_batch
from cryorefine.estep.settings import EStepSettings
from cryorefine.estep.images import Window, prepare_batch
from cryorefine.estep.poses import PoseGrid
from cryorefine.estep.stages import NO_STAGES
from cryorefine.estep.sums import WeightedSums
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.healpix import make_sampling
from cryorefine.io.mrc import write_map
from cryorefine.io.particles import load_particles
from cryorefine.io.prefetch import read_ahead
from cryorefine.projection.extract import prepare_padded_transform
from cryorefine.projection.insert import BackProjector
from cryorefine.simulate import simulate_particles
from cryorefine.tiling import TileTooLarge, run_tiles
from live_bytes import LiveBytes
from test_estep_reference import _blob_map

BOX, ANGPIX, N = 24, 3.0, 8
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(tmp_path, box=BOX, n=N, noise_temper=1.0, device=None):
    """A simulated batch (CTF, SNR 0.05) with its window, reference and pose grid; σ² × noise_temper flattens
    posteriors."""
    truth = _blob_map(box)
    info = simulate_particles(
        truth.float(),
        ANGPIX,
        tmp_path,
        n,
        snr=0.05,
        defocus_min_angst=6000.0,
        defocus_max_angst=14000.0,
        max_shift_angst=4.0,
        seed=11,
    )
    table = load_particles(tmp_path / "particles.star")
    window = Window.build(box, box // 3, device)
    sigma2 = torch.full((1, box // 2 + 1), noise_temper * box * box / 2.0, dtype=torch.float64)
    batch = prepare_batch(
        table,
        np.arange(n),
        window,
        sigma2.to(device),
        torch.ones(1, dtype=torch.float64),
        2.5 * box,
        ANGPIX,
        True,
        True,
        torch.Generator().manual_seed(1),
        device,
    )
    ref = prepare_padded_transform((truth / info["noise_sigma"]).float().to(device), 2)
    grid = PoseGrid.build(make_sampling(1, "C1", 0.1), 1.5, 1.0, device=device)
    return dict(
        table=table,
        batch=batch,
        window=window,
        ref=ref,
        grid=grid,
        coarse_shell=box // 6,
        settings=EStepSettings(angpix=ANGPIX),
    )


def tile_shape(c) -> memory.TileShape:
    g = c["grid"]
    return memory.TileShape(
        1, g.n_translations, g.n_rotations, g.n_rotations, c["window"].prefix(c["coarse_shell"]), c["window"].size
    )


def coarse_stage(c):
    """The tile's coarse pass, significance and fine slots, as _expectation_tile runs them (returns the slots)."""
    jc = c["window"].prefix(c["coarse_shell"])
    logp, rot_prior, blocks = diff2.coarse_log_posterior(
        c["batch"], c["window"], jc, [c["ref"]], c["grid"], c["settings"], None, None
    )
    mask, _, total = weights.coarse_significant(logp, c["settings"], blocks)
    del logp
    return slots_module.fine_slots(mask, total, rot_prior, None, c["grid"].n_rotations)


def run_tile(c, sums: bool = True):
    s = (
        WeightedSums.zeros(1, c["window"].box, 2, 1, c["grid"].sampling.n_directions, device=c["batch"].f_masked.device)
        if sums
        else None
    )
    return expectation._expectation_tile(
        c["batch"],
        c["window"],
        c["coarse_shell"],
        [c["ref"]],
        c["grid"],
        c["settings"],
        s,
        None,
        NO_STAGES,
        None,
        1 << 40,
    )


def predicted_tile_bytes(c, slots) -> tuple[int, int]:
    """(coarse stage, whole tile) bytes predicted for the case's batch as one tile, its fine pass in groups of similar
    slot counts."""
    n, g, J = len(c["batch"]), c["grid"], c["window"].size
    G8, T4 = len(slots.g_class) * 8, g.n_translations * 4
    coarse = memory.coarse_bytes(n, tile_shape(c))
    groups = slots_module.slot_groups(slots, lambda L: n)  # the fine pass's groups of similar slot counts
    chunk = max(memory.fine_chunk_bytes(len(rows), T4, Lc * 8, J) for rows, Lc in groups)
    fine = max(memory.fine_projection_bytes(G8, J), memory.union_bytes(G8, J) + chunk)
    return coarse, max(coarse, fine)


# ----------------------------------------------------------------------------- the size model (CPU, measured)


@pytest.mark.parametrize("noise_temper", [1.0, 50.0])  # 50: flat posteriors, nearly every coarse sample significant
def test_tile_model_bounds_the_measured_peak(tmp_path, monkeypatch, noise_temper):
    # small interpolation chunks, so the per-particle terms (not one extraction's temporaries) set the peaks
    monkeypatch.setattr(extract, "MAX_POINTS", 1 << 14)
    monkeypatch.setattr(memory, "MAX_POINTS", 1 << 14)
    c = make_case(tmp_path, noise_temper=noise_temper)
    with LiveBytes() as coarse_peak:
        slots = coarse_stage(c)
    with LiveBytes() as tile_peak:
        run_tile(c)
    pred_coarse, pred_tile = predicted_tile_bytes(c, slots)
    print(
        f"\n[temper {noise_temper}] coarse stage: measured {coarse_peak.peak / 1e6:.1f} MB, "
        f"predicted {pred_coarse / 1e6:.1f} MB; "
        f"tile: measured {tile_peak.peak / 1e6:.1f} MB, predicted {pred_tile / 1e6:.1f} MB"
    )
    assert coarse_peak.peak <= pred_coarse <= 3 * coarse_peak.peak
    assert tile_peak.peak <= pred_tile <= 2.5 * tile_peak.peak


def test_extraction_model_bounds_the_measured_peak(monkeypatch):
    ref = prepare_padded_transform(torch.randn(BOX, BOX, BOX), 2)
    win = Window.build(BOX, 14)
    g = torch.Generator().manual_seed(0)
    rot = euler_to_matrix(*(torch.rand(600, generator=g) * s for s in (360.0, 180.0, 360.0))).float()
    # the model is the GPU's (grid_sample and its temporaries): measured on the same operations on the CPU
    monkeypatch.setattr(
        "cryorefine.projection.cpu_kernels.extract_planar",
        lambda f, r, ky, kx, pad, out, power=None: extract.extract_by_grid_sample(ref, r, ky, kx, out),
    )
    with LiveBytes() as lb:
        extract.extract_central_slices(ref, rot, win.ky, win.kx)
    pred = memory.projection_bytes(600, win.size)
    assert lb.peak <= pred <= 1.5 * lb.peak


def test_tile_sizes_halve_until_they_fit():
    assert memory.largest_fitting(1000, 300, lambda m: m) == 250  # 1000 -> 500 -> 250
    assert memory.largest_fitting(7, 1, lambda m: 2 * m) == 0
    s = memory.TileShape(2, 25, 4608, 4608, 900, 4000)
    budget = memory.coarse_bytes(100, s)
    assert memory.particles_per_tile(1024, budget, s) == 64
    assert memory.particles_per_tile(1024, 0, s) == 1  # one particle is tried (and fails clearly) rather than none
    assert memory.fine_particles_per_chunk(64, 1 << 40, 1000, 100, 80, 4000) == 64
    with pytest.raises(TileTooLarge, match="fine pass"):
        memory.fine_particles_per_chunk(64, memory.union_bytes(1000, 4000), 1000, 100, 80, 4000)


# ----------------------------------------------------------------------------- halving on running out of memory


def test_run_tiles_halves_a_tile_that_runs_out_of_memory_and_commits_each_item_once():
    committed, tried = [], []

    def compute(a, b):
        tried.append((a, b))
        if b - a > 3:
            raise torch.OutOfMemoryError("fake: tile too large")
        return list(range(a, b))

    size = run_tiles(10, 10, compute, lambda a, b, r: committed.extend(r))
    assert committed == list(range(10))
    assert size == 2 and tried[:3] == [(0, 10), (0, 5), (0, 2)]
    with pytest.raises(torch.OutOfMemoryError):
        run_tiles(3, 1, lambda a, b: (_ for _ in ()).throw(torch.OutOfMemoryError("fake")), lambda *x: None)


def _estep(c, sums=True):
    s = WeightedSums.zeros(1, c["window"].box, 2, 1, c["grid"].sampling.n_directions) if sums else None
    res = expectation_batch(c["batch"], c["window"], c["coarse_shell"], [c["ref"]], c["grid"], c["settings"], s)
    return res, s


def _assert_same_estep(a, b, same_fraction: float = 1.0, tol: float = 1e-5):
    """Same poses, per-particle statistics and weighted sums, up to float32 summation order.

    ``same_fraction`` < 1 (GPU: cuBLAS picks other kernels for other tile sizes) lets that share of the particles
    match in pose and significant count, for near-ties and samples at the significance boundary.
    """
    (ra, sa), (rb, sb) = a, b
    pa = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(ra).items()}
    pb = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(rb).items()}
    same = np.ones(len(pa["class_index"]), dtype=bool)
    for k in ("fine_pose", "offsets_px", "class_index", "n_significant"):
        same &= (pa[k] == pb[k]).reshape(len(same), -1).all(1).numpy()
    assert same.mean() >= same_fraction, f"{int((~same).sum())} of {len(same)} particles differ"
    torch.testing.assert_close(pa["max_prob"][same], pb["max_prob"][same], atol=tol, rtol=0)
    torch.testing.assert_close(pa["loglik"][same], pb["loglik"][same], atol=1e-3, rtol=0)
    torch.testing.assert_close(pa["residual_power"][same], pb["residual_power"][same], rtol=tol, atol=0)
    for x, y in zip(sa.tensors(), sb.tensors()):
        x, y = x.cpu().double(), y.cpu().double()
        assert float((x - y).norm()) <= tol * float(y.norm()) + 1e-12


def test_estep_split_by_out_of_memory_equals_unsplit(tmp_path, monkeypatch):
    c = make_case(tmp_path)
    whole = _estep(c)
    tile = expectation._expectation_tile
    sizes = []

    def tight(batch, *args):  # a device that runs out of memory beyond 3 particles per tile, at the tile's very end
        sizes.append(len(batch))
        result = tile(batch, *args)
        if len(batch) > 3:  # a failed tile's work must not reach the sums
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return result

    monkeypatch.setattr(expectation, "_expectation_tile", tight)
    split = _estep(c)
    assert sizes == [8, 4, 2, 2, 2, 2]  # 8 and 4 fail, then tiles of 2: each particle computed and added once
    _assert_same_estep(split, whole)


def test_global_coarse_projections_are_extracted_once_per_reference_on_the_cpu(tmp_path, monkeypatch):
    """The tiles of a batch (and the batches of a half pass) share one extraction of every coarse rotation's
    projection on the CPU, with the results of extracting per tile; another reference is extracted anew."""
    import cryorefine.estep.poses as poses_module

    c = make_case(tmp_path)
    calls = []
    real = poses_module.extract_central_slices_planar
    monkeypatch.setattr(poses_module, "extract_central_slices_planar", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(expectation, "particles_per_tile", lambda n, *a: 2)  # 4 tiles of 2 particles
    grid = lambda: PoseGrid.build(make_sampling(1, "C1", 0.1), 1.5, 1.0)  # noqa: E731

    monkeypatch.setattr(poses_module, "CPU_PROJECTION_CACHE_BYTES", 0)  # control: nothing kept, one extraction per tile
    per_tile = _estep(dict(c, grid=grid()))
    assert len(calls) == 4
    monkeypatch.setattr(poses_module, "CPU_PROJECTION_CACHE_BYTES", 1 << 30)
    calls.clear()
    c2 = dict(c, grid=grid())
    shared = _estep(c2)
    assert len(calls) == 1
    _assert_same_estep(shared, per_tile, tol=1e-6)
    _estep(
        dict(c2, ref=prepare_padded_transform(torch.roll(torch.randn(BOX, BOX, BOX), 1, 0), 2))
    )  # the next half's reference
    assert len(calls) == 2


def test_fine_pass_in_chunks_of_one_equals_one_chunk(tmp_path, monkeypatch):
    c = make_case(tmp_path)
    whole = _estep(c)
    groups = []
    real_groups = expectation.slot_groups
    monkeypatch.setattr(expectation, "fine_particles_per_chunk", lambda n, *a: 1)
    monkeypatch.setattr(
        expectation, "slot_groups", lambda slots, rows_for: groups.extend(g := real_groups(slots, rows_for)) or g
    )
    _assert_same_estep(_estep(c), whole)
    assert groups and all(len(rows) == 1 for rows, _ in groups)  # the patched budget was used: one particle per group


def test_a_fine_pass_over_budget_halves_the_tile(tmp_path, monkeypatch):
    c = make_case(tmp_path)
    whole = _estep(c)
    real = expectation.fine_particles_per_chunk

    tiles = []

    def small_device(n, budget, *a):  # the union of more than 2 particles does not fit
        tiles.append(n)
        if n > 2:
            raise TileTooLarge("fake: fine pass over budget")
        return real(n, budget, *a)

    monkeypatch.setattr(expectation, "fine_particles_per_chunk", small_device)
    _assert_same_estep(_estep(c), whole)
    assert tiles[:2] == [8, 4] and set(tiles[2:]) == {2}  # tiles of 8 and 4 refused, then halved to 2, which fit


def test_insert_retries_a_chunk_that_runs_out_of_memory(monkeypatch):
    win = Window.build(16, 7)
    g = torch.Generator().manual_seed(2)
    rot = euler_to_matrix(*(torch.rand(40, generator=g) * s for s in (360.0, 180.0, 360.0))).float()
    values = torch.randn(40, win.size, dtype=torch.complex64, generator=g)
    weights = torch.rand(40, win.size, generator=g)
    plain = BackProjector.zeros(16, 2)
    plain.insert(rot, win.ky, win.kx, values, weights)
    corners = insert._trilinear_corners

    def tight(coords, size):
        if coords.shape[0] > 7:
            raise torch.OutOfMemoryError("fake")
        return corners(coords, size)

    monkeypatch.setattr(insert, "_trilinear_corners", tight)
    split = BackProjector.zeros(16, 2)  # the chunked PyTorch path (a GPU's float64 accumulators), run on the CPU
    monkeypatch.setattr(
        "cryorefine.projection.cpu_kernels.insert", lambda data, weight, pad, *a: insert.insert_by_index_add(split, *a)
    )
    split.insert(rot, win.ky, win.kx, values, weights)
    torch.testing.assert_close(split.data, plain.data, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.weight, plain.weight, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fixed volumes


def test_estep_volumes_at_box_256():
    sizes = memory.estep_volume_bytes(512, 1, 2)
    per_half = (sizes["references"] + sizes["backprojectors"] / 2) / 1e9
    assert 1.3 < per_half < 1.4  # DESIGN.md: ~1.3 GB per half at box 256, pad 2
    memory.check_estep_volumes(256, 2, 512, 1, 2, free=80 << 30)
    with pytest.raises(Exception) as info:
        memory.check_estep_volumes(256, 2, 512, 4, 4, free=4 << 30)
    text = str(info.value)
    print("\n" + text)
    assert "\n" not in text
    for part in (
        "box 256",
        "--pad 2 (whole)",
        "4 padded reference(s) 2.01 GiB",
        "4 back-projector(s) 3.01 GiB",
        "4.00 GiB are free",
        "smaller --pad",
        "fewer classes",
        "CPU",
        "more memory",
    ):
        assert part in text, part
    with pytest.raises(Exception) as info:
        memory.check_estep_volumes(256, 2, 200, 6, 6, free=100 << 20)
    assert "windowed to 200 of 512 padded voxels" in str(info.value)


def test_refine_stops_before_the_first_iteration_when_the_volumes_cannot_fit(tmp_path, monkeypatch, capsys):
    """Auto-refine stops at the start (its final iteration needs the whole grids); classification before its first
    E-step (each iteration checks its window's grids)."""
    import cryorefine.refine.context as run_context

    simulate_particles(_blob_map(24).float(), ANGPIX, tmp_path / "data", 8, snr=0.1, seed=2)
    write_map(tmp_path / "ref.mrc", _blob_map(24).float().numpy(), ANGPIX)
    monkeypatch.setattr(run_context, "available_bytes", lambda device: 1 << 20)  # a GPU with 1 MiB free
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    for command in (["refine"], ["classify", "--K", "3"]):
        rc = cli(
            [
                *command,
                "--i",
                str(tmp_path / "data" / "particles.star"),
                "--o",
                str(tmp_path / command[0] / "run"),
                "--ref",
                str(tmp_path / "ref.mrc"),
                "--particle_diameter",
                "60",
                "--iter",
                "1",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()[-1]
        print("\n" + err)
        assert rc == 2 and "E-step's volumes" in err and "0.00 GiB are free" in err
        assert not list((tmp_path / command[0]).glob("run_it*"))


def test_a_run_that_will_park_sizes_its_image_cache_beside_the_resident_volumes(tmp_path, monkeypatch):
    """Auto-refine whose final iteration will park half set 1's back-projector: the image cache and the batches are
    sized beside a reference and one back-projector (what the GPU then holds), not two."""
    import cryorefine.refine.context as run_context
    from cryorefine.refine.auto_refine import ESTEP_VOLUMES
    from cryorefine.refine.config import RefineConfig

    simulate_particles(_blob_map(24).float(), ANGPIX, tmp_path / "data", 8, snr=0.1, seed=2)
    write_map(tmp_path / "ref.mrc", _blob_map(24).float().numpy(), ANGPIX)
    cfg = RefineConfig(particles=str(tmp_path / "data" / "particles.star"), output_root=str(tmp_path / "out" / "run"),
                       reference=str(tmp_path / "ref.mrc"), particle_diameter=60.0)  # fmt: skip
    fixed = []
    monkeypatch.setattr(run_context, "available_bytes", lambda device: 8 << 30)  # as if on a GPU
    monkeypatch.setattr(run_context, "image_cache_bytes", lambda device, f, peers: fixed.append(f) or 0)
    for parks in (False, True):
        monkeypatch.setattr(run_context, "park_finished_half", lambda free, size, parks=parks: parks)
        run_context.open_run(cfg, None, ESTEP_VOLUMES)
    both, resident = (sum(memory.estep_volume_bytes(48, 1, k).values()) for k in (2, 1))
    assert fixed == [both, resident]


# ----------------------------------------------------------------------------- host memory: batches, read ahead


def test_read_ahead_loads_the_next_item_while_the_current_is_used():
    started = {i: threading.Event() for i in range(3)}

    def load(i):
        started[i].set()
        return i * 10

    seen = []
    for item, value in read_ahead(load, [0, 1, 2]):
        if item < 2:  # the next load runs while this item is being used (a serial loader would never start it)
            assert started[item + 1].wait(5.0)
        seen.append((item, value))
    assert seen == [(0, 0), (1, 10), (2, 20)]


def test_expectation_reads_images_batch_by_batch(tmp_path, monkeypatch):
    from cryorefine.io import image_cache
    from cryorefine.refine.config import RefineConfig
    from cryorefine.refine.engine import EStepPass, EStepRuntime, ParticlePoses, run_expectation
    from cryorefine.refine.timing import StageTimer

    c = make_case(tmp_path)
    reads = []
    real = image_cache.read_images
    monkeypatch.setattr(
        image_cache, "read_images", lambda table, idx, out=None: reads.append(len(idx)) or real(table, idx, out=out)
    )
    cfg = RefineConfig(
        particles="", output_root="", reference="", particle_diameter=2.5 * BOX, ctf=True, zero_mask=True, angpix=ANGPIX
    )
    sums = WeightedSums.zeros(1, BOX, 2, 1, c["grid"].sampling.n_directions)
    sigma2 = torch.full((1, BOX // 2 + 1), BOX * BOX / 2.0, dtype=torch.float64)
    job = EStepPass(
        [c["ref"]], c["grid"], c["window"], 6, sigma2, GroupScales.one_for_all(len(c["table"])), c["settings"]
    )
    run_expectation(
        c["table"],
        np.arange(N),
        ParticlePoses.from_table(c["table"]),
        job,
        sums,
        EStepRuntime(cfg, (0, 1, 1), StageTimer(), None, 3),
    )
    assert reads == [3, 3, 2]


def test_a_pass_over_cached_images_takes_each_batch_only_when_the_last_has_run(tmp_path, monkeypatch):
    """Reading ahead takes the next batch from the task pool while the current one runs; with every image in the GPU's
    cache there is nothing to read, and a batch taken early would leave one rank two batches at a pass's end. A batch's
    results are stored (progress told) once the next batch's E-step is queued, or at the pass's end."""
    from cryorefine.io.image_cache import ImageCache
    from cryorefine.refine import engine
    from cryorefine.refine.config import RefineConfig
    from cryorefine.refine.engine import EStepPass, EStepRuntime, ParticlePoses, run_expectation
    from cryorefine.refine.timing import StageTimer

    c = make_case(tmp_path)
    cfg = RefineConfig(
        particles="", output_root="", reference="", particle_diameter=2.5 * BOX, ctf=True, zero_mask=True, angpix=ANGPIX
    )
    sigma2 = torch.full((1, BOX // 2 + 1), BOX * BOX / 2.0, dtype=torch.float64)
    cache = ImageCache(N, BOX, N, "cpu")

    events: list[str] = []
    expectation_batch = engine.expectation_batch

    def estep(*args, **kwargs):
        events.append("estep")
        return expectation_batch(*args, **kwargs)

    monkeypatch.setattr(engine, "expectation_batch", estep)

    def one_pass():
        events.clear()

        def tasks(n):
            for b in range(n):
                events.append("take")
                yield b

        sums = WeightedSums.zeros(1, BOX, 2, 1, c["grid"].sampling.n_directions)
        job = EStepPass(
            [c["ref"]], c["grid"], c["window"], 6, sigma2, GroupScales.one_for_all(len(c["table"])), c["settings"]
        )
        runtime = EStepRuntime(
            cfg, (0, 1, 1), StageTimer(), lambda n: events.append("done"), 3, tasks=tasks, cache=cache
        )
        run_expectation(c["table"], np.arange(N), ParticlePoses.from_table(c["table"]), job, sums, runtime)
        return list(events)

    assert one_pass()[:3] == ["take", "take", "estep"]  # images to read: the second batch is taken (and read) ahead
    # all cached: one batch at a time, each stored when the next one's E-step is queued
    assert one_pass() == ["take", "estep", "take", "estep", "done", "take", "estep", "done", "done"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@GPU
def test_gpu_tile_model_bounds_the_allocator_peak(tmp_path):
    c = make_case(tmp_path, box=64, n=64, device="cuda")
    c["grid"] = PoseGrid.build(make_sampling(2, "C1", 0.1), 3.0, 1.5, device="cuda")
    c["coarse_shell"] = 12
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    slots = coarse_stage(c)
    coarse_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    run_tile(c)
    tile_peak = torch.cuda.max_memory_allocated() - base
    pred_coarse, pred_tile = predicted_tile_bytes(c, slots)
    print(
        f"\n[gpu] coarse stage: measured {coarse_peak / 1e6:.1f} MB, predicted {pred_coarse / 1e6:.1f} MB; "
        f"tile: measured {tile_peak / 1e6:.1f} MB, predicted {pred_tile / 1e6:.1f} MB"
    )
    assert coarse_peak <= pred_coarse and tile_peak <= pred_tile


@pytest.mark.gpu
@GPU
def test_gpu_estep_under_a_memory_cap_matches_uncapped(tmp_path, monkeypatch):
    """A per-process cap far below one whole-batch tile: the E-step tiles (by the model; and by halving after real
    out-of-memory errors when told a budget larger than the cap) and gives the uncapped results."""
    c = make_case(tmp_path, box=64, n=256, device="cuda")
    c["grid"] = PoseGrid.build(
        make_sampling(2, "C1", 0.1), 5.0, 1.0, device="cuda"
    )  # 4608 rotations × ~80 translations
    c["coarse_shell"] = 12

    def estep(budget=None):
        s = WeightedSums.zeros(1, 64, 2, 1, c["grid"].sampling.n_directions, device="cuda")
        r = expectation_batch(
            c["batch"], c["window"], c["coarse_shell"], [c["ref"]], c["grid"], c["settings"], s, budget_bytes=budget
        )
        return r, s

    whole = estep()
    whole_bytes = memory.coarse_bytes(256, tile_shape(c))
    tiles = []
    tile = expectation._expectation_tile
    monkeypatch.setattr(expectation, "_expectation_tile", lambda batch, *a: tiles.append(len(batch)) or tile(batch, *a))
    total = torch.cuda.get_device_properties(0).total_memory

    def capped(extra: int, budget=None, margin: bool = False):
        """The E-step under a cap of ``extra`` bytes above what is allocated; with ``margin``, ``extra`` more the
        share available_bytes holds back of a cap (so that ``extra`` is what it reports available)."""
        torch.cuda.empty_cache()
        used = torch.cuda.memory_allocated()
        if margin:
            f = memory.SAFETY_FRACTION
            extra = max(extra + memory.SAFETY_MIN_BYTES, int((extra + f * used) / (1 - f)) + 1)
        torch.cuda.set_per_process_memory_fraction((used + extra) / total)
        try:
            return estep(budget)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)

    by_model = capped(whole_bytes // 4, margin=True)
    model_tiles = list(tiles)
    tiles.clear()
    by_halving = capped(
        whole_bytes // 4, budget=4 * whole_bytes
    )  # plans whole tiles; the allocator's errors halve them
    print(
        f"\n[gpu] whole tile predicted {whole_bytes / 2**30:.2f} GiB; "
        f"tiles by the model under a cap of a quarter: {model_tiles}; "
        f"tried while halving: {tiles}"
    )
    assert 1 < max(model_tiles) < 256
    assert tiles[0] == 256 and min(tiles) < 256
    for run in (by_model, by_halving):
        _assert_same_estep(run, whole, same_fraction=0.98, tol=1e-4)  # 3 of 256 near-ties differed on an H100


# ----------------------------------------------------------------------------- the M-step and the memory plan


@pytest.mark.parametrize("box, grid, max_shell, gridding", [(48, 96, 24, 10), (48, 46, 10, 10), (64, 128, 32, 0)])
def test_mstep_reconstruct_model_bounds_the_measured_peak(box, grid, max_shell, gridding, monkeypatch):
    """reconstruct() of accumulators on a grid of edge ``grid`` (windowed when < 2·box) up to ``max_shell``, slabs
    small (the cube and the P × P × m buffer, not one slab, set the peak)."""
    import cryorefine.reconstruction.padded_fft as padded_fft
    from cryorefine.reconstruction.reconstruct import reconstruct

    monkeypatch.setattr(padded_fft, "SLAB_BYTES", 1 << 16)
    bp = BackProjector.zeros(box, 2, size=grid)
    bp.data.normal_(generator=torch.Generator().manual_seed(0))
    bp.weight.uniform_(generator=torch.Generator().manual_seed(1))
    tau2 = torch.linspace(2.0, 0.01, box // 2 + 1, dtype=torch.float64)
    with LiveBytes() as lb:
        reconstruct(bp, tau2, max_shell=max_shell, gridding_iterations=gridding, particles=5.0)
    pred = memory.reconstruct_bytes(box, 2, grid, max_shell)
    print(f"\nmeasured {lb.peak / 1e6:.1f} MB, predicted {pred / 1e6:.1f} MB")
    assert lb.peak <= pred <= 2 * lb.peak


def test_memory_plan_picks_the_gpu_or_the_host_and_says_why(monkeypatch):
    """Given a free budget: the E-step's check (stop or go) and the M-step's rung, for the issue's jobs."""
    from types import SimpleNamespace

    from cryorefine.refine import steps

    gib = 1 << 30
    free = {"bytes": 0}
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])

    def ctx(box, sym="C1"):
        return SimpleNamespace(device=torch.device("cuda", 0), box=box, cfg=SimpleNamespace(pad=2, sym=sym))

    def m_step(box, radius, max_shell, join=0, sym="C1", bps=()):
        return steps.mstep_plan(ctx(box, sym), SimpleNamespace(map_radius=radius), list(bps), max_shell, join)

    # box 450, --pad 2 on a 16 GiB card: an intermediate iteration's M-step (window 100 shells, ~6 GiB) fits beside
    # its accumulators; the final iteration's whole-grid one (~57 GiB) runs on the host, its transforms on the GPU
    free["bytes"] = 12 * gib
    mid = m_step(450, 100.5, 100)
    assert mid.device.type == "cuda" and mid.slabs.transforms is None, mid
    assert "grids 406/900" in mid.note and "M-step on the GPU" in mid.note
    final = m_step(450, 225.5, 225, memory.JOINED_BYTES_PER_VOXEL)
    assert final.device.type == "cpu" and final.slabs.transforms.type == "cuda" and final.slabs.buffer.type == "cuda"
    assert "grids 900/900" in final.note and "M-step on the host" in final.note and "12.00 GiB are free" in final.note
    # with 4 GiB free the 5.8 GiB buffer goes to pinned host memory, unless moving the accumulators frees enough
    free["bytes"] = 4 * gib
    assert m_step(450, 225.5, 225, memory.JOINED_BYTES_PER_VOXEL).slabs.buffer.type == "cpu"
    gpu_bp = SimpleNamespace(data=SimpleNamespace(nbytes=3 * gib, device=torch.device("cuda", 0)),
                             weight=SimpleNamespace(nbytes=gib))  # fmt: skip
    assert m_step(450, 225.5, 225, memory.JOINED_BYTES_PER_VOXEL, bps=[gpu_bp]).slabs.buffer.type == "cuda"
    # the final E-step's whole grids: 10.9 GiB
    free["bytes"] = 12 * gib
    steps.check_estep_memory(ctx(450), SimpleNamespace(map_radius=225.5), 1, 2)
    # its batches: half of what the volumes and the image cache leave on a 16 GiB card (~1.6 GiB) in box-450 images
    assert memory.batch_fitting(int((15.2 - 10.89 - 1.13) * gib), 450, 1024) == 128
    assert memory.batch_fitting(100 * gib, 450, 1024) == 1024 and memory.batch_fitting(0, 450, 1024) == 32
    free["bytes"] = 10 * gib
    with pytest.raises(Exception, match="10.89 GiB, but 10.00 GiB are free"):
        steps.check_estep_memory(ctx(450), SimpleNamespace(map_radius=225.5), 1, 2)
    # box 360, K = 6, --pad 2 at a class3d window of 40 shells on a 12 GiB card: small volumes, the M-step on the GPU
    steps.check_estep_memory(ctx(360), SimpleNamespace(map_radius=40.5), 6, 6)
    assert m_step(360, 40.5, 40).device.type == "cuda"
    # the whole grids of six classes do not fit: one line, before the E-step
    with pytest.raises(Exception, match="6 padded reference"):
        steps.check_estep_memory(ctx(360), SimpleNamespace(map_radius=180.5), 6, 6)
    # a point group: symmetrising a large window outgrows 3 GiB
    free["bytes"] = 3 * gib
    assert m_step(360, 40.5, 40, sym="D7").device.type == "cuda"
    assert m_step(360, 150.5, 150, sym="D7").device.type == "cpu"
    # on the CPU there is nothing to plan
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    cpu = SimpleNamespace(device=torch.device("cpu"), box=64, cfg=SimpleNamespace(pad=2, sym="C1"))
    plan = steps.mstep_plan(cpu, SimpleNamespace(map_radius=9.5), [], 9, 0)
    assert plan.device.type == "cpu" and plan.slabs.transforms is None and "M-step" not in plan.note


def test_auto_refine_parks_half_set_1s_back_projector_where_two_would_crowd_the_tiles(monkeypatch):
    """The volumes' last rung (auto-refine): half set 1's back-projector waits in host memory while half set 2 is
    scored when a reference and two back-projectors would take more than half of the free memory; the GPU then
    holds a reference and one back-projector, and the M-step counts the parked one as needed."""
    from types import SimpleNamespace

    from cryorefine.refine import steps

    gib = 1 << 30
    # box 450, --pad 2, the final iteration's whole grids (900): 2.72 + 2 × 4.08 = 10.89 GiB
    assert memory.park_finished_half(int(15.2 * gib), 900)  # a 16 GiB card
    assert not memory.park_finished_half(40 * gib, 900)
    assert not memory.park_finished_half(10 * gib, 512)  # box 256: 2.01 GiB
    free = {"bytes": 8 * gib}
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    ctx = SimpleNamespace(device=torch.device("cuda", 0), box=450, cfg=SimpleNamespace(pad=2, sym="C1"))
    whole, mid = SimpleNamespace(map_radius=225.5), SimpleNamespace(map_radius=100.5)
    steps.check_estep_memory(ctx, whole, 1, 1)  # 6.81 GiB: fits 8 GiB
    with pytest.raises(Exception, match="10.89 GiB, but 8.00 GiB are free"):
        steps.check_estep_memory(ctx, whole, 1, 2)
    free["bytes"] = 12 * gib
    note = steps.parking_note(ctx, whole)
    assert "half set 1's back-projector in host memory" in note and "10.89 GiB, more than half of the 12.00" in note
    assert steps.parking_note(ctx, mid) == ""  # window 100: grids 406, 1.0 GiB
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert steps.parking_note(SimpleNamespace(device=torch.device("cpu"), box=450, cfg=ctx.cfg), whole) == ""
    # the M-step at window 100: on the GPU unless the parked accumulators, brought back, no longer leave it room
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    need = memory.mstep_bytes(450, 2, 406, 100, False, 0)

    def parked(nbytes):
        return SimpleNamespace(
            data=SimpleNamespace(nbytes=nbytes, device=torch.device("cpu")), weight=SimpleNamespace(nbytes=0)
        )

    assert steps.mstep_plan(ctx, mid, [parked(free["bytes"] - need - gib)], 100, 0).device.type == "cuda"
    assert steps.mstep_plan(ctx, mid, [parked(free["bytes"] - need + gib)], 100, 0).device.type == "cpu"


def test_an_mstep_that_runs_out_of_gpu_memory_runs_again_on_the_host():
    """The byte model is an estimate: a GPU M-step that runs out of memory anyway runs once more on the host rung
    (the accumulators moved there, the transforms on the GPU, their buffer pinned on the host), and says so."""
    from types import SimpleNamespace

    from cryorefine.reconstruction.padded_fft import SAME_DEVICE
    from cryorefine.refine import steps

    ctx = SimpleNamespace(device=torch.device("cuda", 0))
    bps = [BackProjector.zeros(8, 2)]
    calls = []

    def maximize(bps, slabs):
        calls.append(slabs)
        if slabs.transforms is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "maps"

    gpu = steps.MStepPlan(torch.device("cuda", 0), SAME_DEVICE, "grids 16/16 padded voxels, M-step on the GPU")
    where, result = steps.maximized(ctx, gpu, bps, maximize)
    assert result == "maps" and len(calls) == 2
    assert where.device.type == "cpu" and where.slabs.transforms.type == "cuda" and where.slabs.buffer.type == "cpu"
    assert "ran out of GPU memory there: on the host" in where.note
    # a host M-step that runs out of memory is not retried
    host = steps.MStepPlan(torch.device("cpu"), where.slabs, "host")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        steps.maximized(ctx, host, bps, lambda bps, slabs: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))


def test_classification_keeps_its_references_on_the_host_where_k_of_each_would_not_fit(monkeypatch):
    """Classification's last volume rung: where K references and K back-projectors would not fit the free memory but
    two references and K back-projectors do, the references wait in host memory (run.log says why) and the start
    check counts two; where even that does not fit, the run still stops with one line."""
    from types import SimpleNamespace

    from cryorefine.refine import steps

    gib = 1 << 30
    # box 360, --pad 2, K = 6, whole grids (720): 20.91 GiB with the references, 15.34 GiB with two of them
    assert memory.references_on_host(int(18 * gib), 720, 6)
    assert not memory.references_on_host(int(22 * gib), 720, 6)  # everything fits: no copies
    assert not memory.references_on_host(int(14 * gib), 720, 6)  # not even two: the start check refuses
    assert not memory.references_on_host(int(18 * gib), 720, 2)  # two classes: nothing to gain
    free = {"bytes": 18 * gib}
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    ctx = SimpleNamespace(device=torch.device("cuda", 0), box=360, cfg=SimpleNamespace(pad=2, sym="C1"))
    whole, mid = SimpleNamespace(map_radius=180.5), SimpleNamespace(map_radius=70.5)
    note = steps.references_on_host_note(ctx, whole, 6)
    assert "the 6 references in host memory" in note and "20.91 GiB, 18.00 GiB free" in note
    steps.check_estep_memory(ctx, whole, 2, 6)  # what classify3d checks when it takes the rung
    with pytest.raises(Exception, match="20.91 GiB, but 18.00 GiB are free"):
        steps.check_estep_memory(ctx, whole, 6, 6)
    assert steps.references_on_host_note(ctx, mid, 6) == ""  # window 70: grids 286
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert (
        steps.references_on_host_note(SimpleNamespace(device=torch.device("cpu"), box=360, cfg=ctx.cfg), whole, 6) == ""
    )
