"""A run's configuration, as the command line gave it (frozen; the run resolves the pixel size into a copy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ctf import CtfOptions


@dataclass(frozen=True)
class RefineConfig:
    particles: str
    output_root: str
    reference: str
    ini_high: float = 30.0
    particle_diameter: float = 0.0
    sym: str = "C1"
    healpix_order: int = 2
    offset_range: float = 5.0  # pixels
    offset_step: float = 2.0  # pixels
    sigma_offset: float = 10.0  # Å: initial width of the offset prior (RELION's --offset)
    min_sigma2_offset: float = 2.0  # Å²: lower bound of the offset prior's variance (RELION 5)
    auto_local_healpix_order: int = 4
    # degrees: local searches from the start with this prior σ on all three angles (RELION: wins over the next three),
    # or these on each angle (0: that angle unrestricted), about the STAR's angle priors where it has them
    sigma_ang: float = 0.0
    sigma_rot: float = 0.0
    sigma_tilt: float = 0.0
    sigma_psi: float = 0.0
    low_resol_join_halves: float = 40.0
    solvent_mask: str | None = None
    solvent_correct_fsc: bool = False  # auto-refine: the FSC of the unregularised half maps under the solvent mask
    flatten_solvent: bool = False
    zero_mask: bool = False
    ctf: bool = False
    ctf_intact_first_peak: bool = False  # RELION's --ctf_intact_first_peak
    ctf_phase_flipped: bool = False  # RELION's --ctf_phase_flipped (also set by data_optics' rlnCtfDataArePhaseFlipped)
    only_flip_phases: bool = False  # RELION's --only_flip_phases
    norm: bool = False
    scale: bool = False
    firstiter_cc: bool = False
    pad: int = 2
    maxsig: int = 0
    random_seed: int = 0
    perturb: float = 0.5
    incr_size: int = 10
    strict_highres_exp: float = 0.0  # Å; > 0 scores poses and classes only up to this resolution
    adaptive_fraction: float = 0.999
    tau2_fudge: float = 1.0
    skip_gridding: bool = False  # RELION >= 4's reconstruction; default RELION 3.1's gridding iterations
    max_iter: int = 999  # RELION's --auto_iter_max
    batch_size: int = 0  # 0: automatic
    max_seconds: float = 0.0  # > 0: stop cleanly before an iteration that would end past this many seconds of this call
    precision: str = "tf32"  # coarse-pass matrix products: tf32 (fp32 on the CPU), fp32 or fp16
    image_cache: bool = True  # on a GPU, keep the particle images there after their first read while they fit
    gpu_memory_gib: float = 0.0  # --gpu_memory: at most this much of the GPU per process (0: all)
    preread_images: bool = False  # every image in host memory before the first iteration
    scratch_dir: str = ""  # copy the stacks here first and read them there
    device: str = "cpu"
    threads: int = 0
    continue_from: str | None = None
    angpix: float = 0.0  # Å/px: 0 until the run reads it from the particles (RunContext.cfg has it)

    @property
    def ctf_options(self) -> CtfOptions:
        """The run's CTF flags (ctf.CtfOptions)."""
        return CtfOptions(self.ctf_intact_first_peak, self.ctf_phase_flipped, self.only_flip_phases)


BATCHES_PER_RANK = 8  # per iteration, at least, under torchrun with several ranks (the pool's granularity)


def auto_batch_size(n_particles: int, world_size: int, on_gpu: bool) -> int:
    """Particles per E-step batch for --batch 0: 4096 on a GPU, 256 on the CPU. With several ranks, smaller batches
    so that each rank gets about BATCHES_PER_RANK of an iteration's batches or more (the pool balances ranks only batch
    by batch): n / (8 · ranks), rounded down to a multiple of 32, at least 64 (and never above the one-process size).
    A GPU's batch is cut into tiles that fit its memory, and each batch costs the host its own candidate search,
    image preparation and results read: on an H100 (2026-12-06) the betagal-like run's iterations took 16.5-16.6 s
    in batches of 4096 against 17.9-18.4 s in batches of 1024 (bench/results/2026-12-06b-device-runs.md)."""
    base = 4096 if on_gpu else 256
    if world_size <= 1:
        return base
    share = math.ceil(n_particles / (BATCHES_PER_RANK * world_size))
    return min(base, max(64, share // 32 * 32))
