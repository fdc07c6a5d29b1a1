"""What stays fixed through a run: the resolved configuration, the particles and the device, with the run's services
(log, stage timer, task pool, GPU image cache, background writer, report refresher). Built once by :func:`open_run`,
inside :func:`output_lock`, which holds the output prefix's lock for the run."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import CryoInputError, DistributedError
from ..estep.memory import (
    available_bytes,
    batch_fitting,
    check_estep_volumes,
    estep_volumes_total,
    image_cache_bytes,
    park_finished_half,
)
from ..estep.precision import for_device
from ..io.atomic import remove_stale_temporaries
from ..io.background import BackgroundWriter
from ..io.image_cache import ImageCache
from ..io.mrc import read_map
from ..io.particles import load_particles
from ..io.run_lock import RunLock, lock_path
from ..io.scratch import copy_to_scratch
from ..io.table import ParticleTable
from ..parallel.collectives import broadcast_from_main
from ..parallel.context import Dist
from ..parallel.pool import TaskPool
from ..validate import (
    check_diameter_sign,
    check_diameters_fit,
    check_reference,
    data_phase_flipped,
    normalisation_warning,
)
from .config import RefineConfig, auto_batch_size
from .groups import RelionGroups, relion_groups
from .log import RunLog
from .report_refresh import ReportRefresher
from .timing import StageTimer


@dataclass(frozen=True)
class RunContext:
    cfg: RefineConfig  # with the map's pixel size (cfg.angpix): the first optics group's
    dist: Dist
    table: ParticleTable
    device: torch.device
    solvent_mask: torch.Tensor | None  # --solvent_mask, (d, d, d) on the host
    log: RunLog
    timer: StageTimer
    pool: TaskPool
    images: ImageCache
    writer: BackgroundWriter  # rank 0's files of an iteration, written while the next one computes
    report: ReportRefresher
    groups: RelionGroups  # RELION's micrograph groups of the particles
    memory_batch: int = 0  # the most particles per E-step batch the GPU's memory allows (0: no limit)
    scratch: Path | None = None  # --scratch_dir: this process's copies of the stacks (removed when the run ends)

    @property
    def box(self) -> int:
        """The map's box (px): the first optics group's (RELION's ori_size)."""
        return self.table.reference_optics.box

    @property
    def n_shells(self) -> int:
        """Length of the σ² spectra: each optics group's are in its own images' shells, up to the largest Nyquist."""
        return max(o.box for o in self.table.optics) // 2 + 1

    @property
    def angpix(self) -> float:
        return self.cfg.angpix

    @property
    def n_groups(self) -> int:
        return len(self.table.optics)

    @property
    def root(self) -> str:
        return self.cfg.output_root

    @property
    def batch_size(self) -> int:
        if self.cfg.batch_size > 0:
            return self.cfg.batch_size
        auto = auto_batch_size(len(self.table), self.dist.world_size, self.device.type == "cuda")
        return min(auto, self.memory_batch) if self.memory_batch else auto


def capped_gpu_memory(device: torch.device, gib: float) -> str | None:
    """--gpu_memory: this process may allocate at most ``gib`` GiB of the GPU ``device`` (every memory decision,
    estep/memory.py, reads the cap); the line for run.log, or None without a cap or a GPU."""
    if gib <= 0 or device.type != "cuda":
        return None
    total = torch.cuda.mem_get_info(device)[1]
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return f"--gpu_memory: at most {fraction * total / 2**30:.1f} of the GPU's {total / 2**30:.1f} GiB"


@contextmanager
def output_lock(cfg: RefineConfig, dist: Dist | None) -> Iterator[None]:
    """Hold ``<output_root>.lock`` (io/run_lock.py) while the block runs: rank 0 alone takes it, before open_run
    writes anything, and releases it however the block ends (success, error, Ctrl-C, SIGTERM: the CLI's and
    torchrun's handlers raise). A live run's lock stops the start with one line (CryoInputError); a stale one is
    replaced, with a line in run.log and on stderr naming it. Under torchrun rank 0's answer goes to every rank
    before any other work, so that a refused start stops every rank at once with the same line and exit code, as
    validate.py's checks (which every rank makes) do, instead of leaving the others at their first collective."""
    dist = dist if dist is not None else Dist(device=cfg.device)
    lock = RunLock(lock_path(cfg.output_root)) if dist.is_main else None
    failure: Exception | None = None
    if lock is not None:
        try:
            lock.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Exception as exc:  # noqa: BLE001 - told to the other ranks, then raised here
            failure = exc
    try:
        told = None if failure is None else (isinstance(failure, CryoInputError), str(failure))
        told = broadcast_from_main(told, dist, "agreeing on the output lock with rank 0")
        if failure is not None:
            raise failure
        if told is not None:
            refused, text = told
            if refused:
                raise CryoInputError(text)
            raise DistributedError(f"rank {dist.rank}: rank 0 could not take the output lock ({text})")
        if lock is not None and lock.replaced:
            RunLog(Path(cfg.output_root).parent / "run.log").line(f"warning: {lock.replaced}")
        yield
    finally:
        if lock is not None:
            lock.release()  # nothing where it was not taken


def open_run(cfg: RefineConfig, dist: Dist | None, volumes: dict, table: ParticleTable | None = None) -> RunContext:
    """Read and check the inputs (validate.py's checks: the CLI made them already, a program that runs the engine
    itself gets the same), stop with one line when the GPU cannot hold the E-step's ``volumes`` (``references`` and
    ``backprojectors`` alive at once; of these at least ``resident_backprojectors`` on the GPU where the others may
    wait in host memory) on the whole grid where the run's last iteration needs it (``whole``; each iteration checks
    its own window: steps.check_estep_memory), and set up the run's services. Rank 0 alone writes files. ``table``:
    cfg.particles as validate.py read it (else read here: reading a large STAR file takes a while)."""
    dist = dist if dist is not None else Dist(device=cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        if torch.device(cfg.device).type == "cpu":
            from ..projection import cpu_kernels  # numba: imported only where it runs

            cpu_kernels.set_threads(cfg.threads)
    if table is None:
        table = load_particles(cfg.particles)
    cfg = replace(
        cfg,
        angpix=table.reference_optics.angpix,
        ctf_phase_flipped=cfg.ctf_phase_flipped or data_phase_flipped(table),
        precision=for_device(cfg.precision, cfg.device),  # the one the coarse pass uses: tf32 is fp32 on the CPU
    )
    box = table.reference_optics.box
    check_diameter_sign(cfg.particle_diameter)
    check_reference(cfg.reference, box, cfg.angpix)
    check_diameters_fit(cfg.particle_diameter, table)
    solvent_mask = None
    if cfg.solvent_mask:
        check_reference(cfg.solvent_mask, box, cfg.angpix, what="solvent mask")
        solvent_mask = torch.from_numpy(read_map(cfg.solvent_mask)[0]).float()
    device = torch.device(cfg.device)
    capped = capped_gpu_memory(device, cfg.gpu_memory_gib)
    free = available_bytes(device)
    counts = {"references": volumes["references"], "backprojectors": volumes["backprojectors"]}
    resident = volumes.get("resident_backprojectors", volumes["backprojectors"])
    if free is not None and volumes["whole"]:
        check_estep_volumes(box, cfg.pad, box * cfg.pad, volumes["references"], resident, free)
        if park_finished_half(free, box * cfg.pad):  # the final iteration will park: the GPU holds the resident ones
            counts["backprojectors"] = resident
    out = Path(cfg.output_root).parent
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:  # temporaries are named by pid, which other hosts cannot check
        remove_stale_temporaries(out)  # left by a killed run
    log = RunLog(out / "run.log", enabled=dist.is_main)
    if capped is not None:
        log.line(capped)
    unnormalised = normalisation_warning(table, cfg.particle_diameter)
    if unnormalised and dist.is_main:
        log.line(f"WARNING: {unnormalised}")
        warnings.warn(unnormalised, stacklevel=1)
    scratch = None
    if cfg.scratch_dir:
        table, scratch, line = copy_to_scratch(table, cfg.scratch_dir)
        log.line(line)
    room = 0
    largest = int(table.boxes.max())  # the cache's slots hold the largest optics group's images
    # room for the whole grids' volumes, or (runs whose windows may stay small) at most half the memory
    fixed = estep_volumes_total(box * cfg.pad, **counts)
    if free is not None and not volumes["whole"]:
        fixed = min(fixed, free // 2)
    if cfg.image_cache:
        room = image_cache_bytes(device, fixed, dist.device_peers)  # 0 on the CPU
    images = ImageCache(len(table), largest, room // (4 * largest * largest), device)
    if cfg.preread_images:
        log.line(images.preread(table))
    memory_batch = 0
    if free is not None and cfg.batch_size == 0:
        memory_batch = batch_fitting(free - fixed - images.nbytes, largest, 1 << 30)
    if device.type == "cuda":
        log.line(
            f"GPU image cache: {images.capacity} of {len(table)} particles ({images.nbytes / 2**30:.2f} GiB)"
            + ("" if cfg.image_cache else "; off (--no_image_cache)")
        )
    writer = BackgroundWriter(star_in_process=device.type == "cuda")  # on a GPU the run's thread is host-bound
    return RunContext(
        cfg, dist, table, device, solvent_mask, log, StageTimer(device), TaskPool(dist), images, writer,
        ReportRefresher(log.line), relion_groups(table), memory_batch, scratch,
    )  # fmt: skip
