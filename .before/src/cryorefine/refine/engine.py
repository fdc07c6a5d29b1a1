"""Shared machinery of auto-refine and classification: references, batched E-step over a particle set, pose
bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Sequence
from typing import Callable, Iterable, Protocol, overload

import numpy as np
import torch

from ..ctf import CtfOptions
from ..estep.expectation import expectation_batch
from ..estep.fixed_poses import expectation_fixed_poses
from ..estep.store import add_power_beyond_window
from ..estep.settings import BatchPoses, EStepSettings
from ..estep.stages import Stages
from ..estep.images import Window, prepare_batch
from ..estep.poses import PoseGrid
from ..estep.sums import WeightedSums
from ..mstep.statistics import GroupScales
from ..fourier.filters import soft_sphere
from ..geometry.euler import euler_to_matrix
from ..geometry.symmetry import symmetry_matrices
from ..io.image_cache import ImageCache
from ..io.particles import angle_priors, offset_priors_angst
from ..io.table import ParticleTable
from ..io.prefetch import read_ahead
from ..projection.extract import PaddedTransform, prepare_padded_transform
from ..transfer import to_device


@dataclass
class ParticlePoses:
    """Current pose estimates of all particles (structure of arrays, host memory)."""

    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    psi_deg: np.ndarray
    origin_x_angst: np.ndarray
    origin_y_angst: np.ndarray
    class_number: np.ndarray  # 1-based
    max_prob: np.ndarray
    n_significant: np.ndarray
    loglik: np.ndarray
    angular_spread_deg: np.ndarray
    offset_spread_px: np.ndarray
    norm_correction: np.ndarray  # RELION's rlnNormCorrection (the image noise std it estimates, --norm)
    residual_power: np.ndarray  # Σ Γ |X̃ − sCP|² of the last E-step over every pixel (the M-step's --norm input)

    @classmethod
    def from_table(cls, t: ParticleTable) -> "ParticlePoses":
        n = len(t)
        norm = (
            t.extra["rlnNormCorrection"].to_numpy(np.float64, copy=True)
            if "rlnNormCorrection" in t.extra
            else np.ones(n)
        )
        norm[~np.isfinite(norm) | (norm <= 0)] = 1.0  # a zero or NaN in the STAR would scale images to infinity
        return cls(
            t.rot_deg.copy(),
            t.tilt_deg.copy(),
            t.psi_deg.copy(),
            t.origin_x_angst.copy(),
            t.origin_y_angst.copy(),
            np.ones(n, dtype=np.int64),
            np.zeros(n),
            np.zeros(n, dtype=np.int64),
            np.zeros(n),
            np.full(n, 999.0),
            np.full(n, 999.0),
            norm,
            np.zeros(n),
        )

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def copy(self) -> "ParticlePoses":
        """A copy with arrays of its own (an iteration's E-step and M-step write into it)."""
        return ParticlePoses(**{k: v.copy() for k, v in self.as_dict().items()})


def solvent_masked(
    volume: torch.Tensor,
    particle_diameter_angst: float,
    angpix: float,
    flatten_solvent: bool,
    solvent_mask: torch.Tensor | None,
) -> torch.Tensor:
    """RELION's solventFlatten: the new reference multiplied by the solvent mask or, with --flatten_solvent, a soft
    sphere of the particle diameter (5 px edge). RELION does this at the end of each M-step but the final one (the maps
    it writes are masked); the initial reference enters the first E-step unmasked."""
    if solvent_mask is not None:
        return volume * solvent_mask.to(volume)
    if flatten_solvent:
        return volume * soft_sphere(
            volume.shape, particle_diameter_angst / (2 * angpix), 5.0, device=volume.device, dtype=volume.dtype
        )
    return volume


def prepare_references(
    maps: list[torch.Tensor], pad: int, device, size: int | None = None, on_host: bool = False
) -> Sequence[PaddedTransform]:
    """The E-step's projectors of ``maps`` as they are (the M-step has flattened them already: solvent_masked); with
    ``on_host`` each is made on ``device`` and moved to pinned host memory at once (HostReferences)."""
    if not on_host:
        return [prepare_padded_transform(m.to(device=device, dtype=torch.float32), pad, size) for m in maps]
    pin = torch.device(device).type == "cuda"
    host = []
    for m in maps:  # one reference on the device at a time
        ref = prepare_padded_transform(m.to(device=device, dtype=torch.float32), pad, size)
        kept = torch.empty(ref.f_padded.shape, dtype=ref.f_padded.dtype, pin_memory=pin).copy_(ref.f_padded)
        host.append(replace(ref, f_padded=kept))
        del ref
    return HostReferences(host, torch.device(device))


class HostReferences(Sequence[PaddedTransform]):
    """Padded references kept in (pinned) host memory; item k is reference k's copy on ``device``, made when asked
    for, so that a copy lives only while its class is projected (classification's last volume rung,
    memory.references_on_host). The E-step asks once per class in each pass of a tile."""

    def __init__(self, host: list[PaddedTransform], device: torch.device):
        self._host, self._device = host, device

    def __len__(self) -> int:
        return len(self._host)

    @overload
    def __getitem__(self, k: int) -> PaddedTransform: ...

    @overload
    def __getitem__(self, k: slice) -> list[PaddedTransform]: ...

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        ref = self._host[k]
        return replace(ref, f_padded=ref.f_padded.to(self._device, non_blocking=True))


def angular_change_deg(rot0, tilt0, psi0, rot1, tilt1, psi1, sym: str = "C1") -> np.ndarray:
    """RELION's change of a pose (HealpixSampling::calculateAngularDistance), (n,) degrees: the mean of the angles
    between the three rows of the two rotation matrices, minimised over the point group's equivalents A1·S of the new
    pose, so that a particle that moves to a symmetry mate has not changed. About 0.79 × the geodesic angle for small
    random rotations."""
    A = euler_to_matrix(torch.as_tensor(rot0), torch.as_tensor(tilt0), torch.as_tensor(psi0))  # (n, 3, 3)
    B = euler_to_matrix(torch.as_tensor(rot1), torch.as_tensor(tilt1), torch.as_tensor(psi1))
    S = symmetry_matrices(sym).to(B)  # (G, 3, 3)
    BS = B[:, None] @ S[None]  # (n, G, 3, 3)
    cos = (A[:, None] * BS).sum(-1).clamp(-1, 1)  # (n, G, 3): row by row
    return torch.rad2deg(torch.acos(cos)).mean(-1).min(-1).values.numpy()


def batch_generator(noise_key: tuple[int, ...], batch: int) -> torch.Generator:
    """The random stream of one batch (the noise outside the particle mask): keyed by (seed, iteration, half) and the
    batch index, so an E-step gives the same result whichever rank takes the batch, in any order."""
    seed = np.random.SeedSequence([*noise_key, batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


@dataclass(frozen=True)
class EStepPass:
    """What one E-step pass over a set of particles needs besides them: references and sampling, windows, the noise
    model and the settings."""

    refs: Sequence[PaddedTransform]
    grid: PoseGrid
    window: Window
    coarse_shell: int
    sigma2: torch.Tensor  # (G, d//2+1) on the compute device
    scale: GroupScales  # per micrograph group, with each particle's group
    settings: EStepSettings
    local: bool = False  # local searches about each particle's pose (settings.local_sigma_deg)
    forced_class: np.ndarray | None = None  # (n,) 0-based: hold each particle to this class
    avg_norm: float | None = None  # --norm: images scaled by avg_norm / rlnNormCorrection
    fixed_poses: str = ""  # "skip_align": only the class, at each particle's pose; "skip_rotate": and its offset


class ImageSettings(Protocol):
    """What the E-step reads of a run's configuration (RefineConfig has it): how images are masked and corrected."""

    @property
    def particle_diameter(self) -> float: ...  # Å

    @property
    def angpix(self) -> float: ...  # Å/px

    @property
    def ctf(self) -> bool: ...

    @property
    def ctf_options(self) -> CtfOptions: ...

    @property
    def zero_mask(self) -> bool: ...

    @property
    def device(self) -> str: ...


@dataclass(frozen=True)
class EStepRuntime:
    """How a pass runs: the image settings, its random stream, timer, progress, batch size, the task pool's batches
    and the GPU's image cache."""

    cfg: ImageSettings
    noise_key: tuple[int, ...]
    timer: Stages
    progress: Callable[[int], None] | None = None
    batch_size: int = 128
    tasks: Callable[[int], Iterable[int]] | None = None
    cache: ImageCache | None = None


@dataclass(frozen=True)
class OpticsFrame:
    """The E-step of the particles of one optics geometry (box, pixel size, magnification): their window (the group's
    pixels, sampling the map at scale·M·k), coarse shell, pose grid (offsets in the group's pixels) and settings."""

    window: Window
    coarse_shell: int
    grid: PoseGrid
    settings: EStepSettings

    @property
    def angpix(self) -> float:
        return self.settings.angpix


def optics_frame(job: EStepPass, box: int, angpix: float, mag: tuple[float, float, float, float]) -> OpticsFrame:
    """``job`` (made on the map's grid: its window's box and settings.angpix, the first optics group's) for the images
    of a ``box`` at ``angpix`` with magnification ``mag``, as RELION 3.1 maps optics groups of other sizes onto the
    map: shells scale by the ratio of the boxes' lengths in Å (image_current_size and image_coarse_size, rounded up),
    at most the group's Nyquist; offsets (Å) are in the group's pixels."""
    window, to_group = group_window(job.window, job.settings.angpix, box, angpix, mag)
    if to_group == 1.0 and box == job.window.box:
        return OpticsFrame(window, job.coarse_shell, job.grid, job.settings)
    max_shell = window.max_shell
    coarse = min(max_shell, math.ceil(job.coarse_shell * to_group - 1e-9))
    score = job.settings.score_shell
    px = job.settings.angpix / angpix  # the map's pixels in the group's
    grid = replace(
        job.grid,
        translations_px=job.grid.translations_px * px,
        translation_children_px=job.grid.translation_children_px * px,
        offset_step_px=job.grid.offset_step_px * px,
    )
    settings = replace(
        job.settings, angpix=angpix, score_shell=None if score is None else min(max_shell, round(score * to_group))
    )
    return OpticsFrame(window, coarse, grid, settings)


def group_window(
    window: Window, map_angpix: float, box: int, angpix: float, mag: tuple[float, float, float, float]
) -> tuple[Window, float]:
    """The window of an optics group of ``box`` at ``angpix`` with magnification ``mag`` for the map's ``window`` (its
    box at ``map_angpix``), and the ratio of the boxes' lengths in Å (a map shell's number in the group's shells):
    RELION 3.1's image_current_size, scaled and rounded up, at most the group's Nyquist."""
    if box == window.box and angpix == map_angpix:
        return window.in_map_frame(mag), 1.0
    to_group = box * angpix / (window.box * map_angpix)
    max_shell = min(box // 2, math.ceil(window.max_shell * to_group - 1e-9))
    return Window.build(box, max_shell, window.ky.device).in_map_frame(mag, 1.0 / to_group), to_group


def map_frame_radius(table: ParticleTable, window: Window, map_angpix: float) -> float:
    """The largest frequency (the map's pixels) the E-step of ``table``'s optics groups reads or writes for the map's
    ``window``: what the windowed references and back-projectors must hold (extract.window_grid_size)."""
    radius = 0.0
    for box, angpix, mag in sorted({(o.box, o.angpix, o.mag) for o in table.optics}):
        w, _ = group_window(window, map_angpix, box, angpix, mag)
        radius = max(radius, float(torch.sqrt(w.map_kx.double() ** 2 + w.map_ky.double() ** 2).max()))
    return radius


def optics_batches(
    table: ParticleTable, rows: np.ndarray, batch_size: int, job: EStepPass
) -> tuple[list[np.ndarray], list[OpticsFrame]]:
    """``rows`` cut into batches of at most ``batch_size``, each of optics groups with one geometry (box, pixel size,
    magnification matrix), and each batch's frame (optics_frame)."""
    geometries = sorted({(o.box, o.angpix, o.mag) for o in table.optics})
    key = np.array([geometries.index((o.box, o.angpix, o.mag)) for o in table.optics])[table.optics_group[rows]]
    batches, frames = [], []
    for m, geometry in enumerate(geometries):
        these = rows[key == m] if len(geometries) > 1 else rows
        frame = optics_frame(job, *geometry)
        for s0 in range(0, len(these), batch_size):
            batches.append(these[s0 : s0 + batch_size])
            frames.append(frame)
    return batches, frames


def fixed_pose_batch(
    batch, frame: OpticsFrame, job: EStepPass, poses_now: ParticlePoses, idx: np.ndarray, sums, forced, timer
) -> BatchPoses:
    """--skip_align/--skip_rotate: the batch's classes (and offsets) at the particles' own orientations
    (estep/fixed_poses.py), with the class prior of ``job.settings.direction_log_prior`` (K, D) summed over its
    directions."""
    prior = frame.settings.direction_log_prior
    k = len(job.refs)
    log_prior = torch.zeros(k) if prior is None else torch.logsumexp(prior.double(), 1)
    rotations = euler_to_matrix(
        *(
            torch.as_tensor(a[idx], dtype=torch.float64)
            for a in (poses_now.rot_deg, poses_now.tilt_deg, poses_now.psi_deg)
        )
    ).to(batch.f_masked.device)
    moves = frame.grid.translations_px if job.fixed_poses == "skip_rotate" else None
    with timer("getAllSquaredDifferences"):
        res = expectation_fixed_poses(
            batch, frame.window, job.refs, rotations, log_prior, sums, frame.settings, moves, forced
        )
    if sums is not None and batch.spectrum_outside is not None:
        add_power_beyond_window(sums, batch, frame.window)
    return res


def results_on_host(res: BatchPoses, residual_power: torch.Tensor | None) -> dict[str, np.ndarray]:
    """A batch's per-particle results (n,) on the host, float64, read from the device at once (the host waits for the
    device once per batch, not once per column); class ids and counts are exact in float64."""
    columns = {
        "offset_x_px": res.offsets_px[:, 0],
        "offset_y_px": res.offsets_px[:, 1],
        "class_index": res.class_index,
        "max_prob": res.max_prob,
        "n_significant": res.n_significant,
        "loglik": res.loglik,
        "angular_spread_deg": res.angular_spread_deg,
        "offset_spread_px": res.offset_spread_px,
    }
    if residual_power is not None:
        columns["residual_power"] = residual_power
    if res.fine_pose is not None:
        columns["coarse_rotation"], columns["fine_child"] = res.fine_pose.T
    host = torch.stack([c.double() for c in columns.values()]).cpu().numpy()
    return dict(zip(columns, host))


def store_batch_results(
    poses_now: ParticlePoses,
    idx: np.ndarray,
    frame: OpticsFrame,
    res: BatchPoses,
    residual_power: torch.Tensor | None,
    progress=None,
) -> np.ndarray:
    """A batch's results (offsets in the frame's Å/px, angles of its pose grid's samples) into ``poses_now`` at rows
    ``idx``, read from the device at once (results_on_host); ``progress(n)`` told; returns ``idx``."""
    host = results_on_host(res, residual_power)
    angpix = frame.angpix
    if res.fine_pose is not None:  # else the particles keep their angles
        eulers = frame.grid.best_eulers_deg(np.stack([host["coarse_rotation"], host["fine_child"]], 1))
        poses_now.rot_deg[idx], poses_now.tilt_deg[idx], poses_now.psi_deg[idx] = eulers.T
    poses_now.origin_x_angst[idx] = host["offset_x_px"] * angpix
    poses_now.origin_y_angst[idx] = host["offset_y_px"] * angpix
    poses_now.class_number[idx] = host["class_index"].astype(np.int64) + 1
    poses_now.max_prob[idx] = host["max_prob"]
    poses_now.n_significant[idx] = host["n_significant"]
    poses_now.loglik[idx] = host["loglik"]
    poses_now.angular_spread_deg[idx] = host["angular_spread_deg"]
    poses_now.offset_spread_px[idx] = host["offset_spread_px"]
    if residual_power is not None:
        poses_now.residual_power[idx] = host["residual_power"]
    if progress is not None:
        progress(len(idx))
    return idx


def run_expectation(
    table: ParticleTable,
    rows: np.ndarray,
    poses_now: ParticlePoses,
    job: EStepPass,
    sums: WeightedSums,
    run: EStepRuntime,
) -> np.ndarray:
    """E-step over ``rows`` in batches; writes the new best poses and each particle's residual power into ``poses_now``
    and adds into ``sums``. The previous offsets come from ``poses_now`` (the particle table is only read from).

    ``run.tasks(n_batches)`` yields the indices of the batches this process does (a task pool; default: all, in
    order). Returns the rows it did; ``run.progress(n)`` is called as each batch's results of n particles are stored:
    once the next batch's images are prepared and its E-step queued, so that the device goes on from one batch to the
    next while the host stores the results.

    With ``job.avg_norm`` (--norm), each image is scaled by avg_norm / rlnNormCorrection (the M-step re-estimates the
    correction from the residual power: mstep/norm.py).
    Host memory holds two batches of images at most: the next one is read from the stacks while this one is computed;
    ``run.cache`` (GPU) keeps images after their first read (none: every image is read in every pass).
    """
    cfg, timer, settings, avg_norm = run.cfg, run.timer, job.settings, job.avg_norm
    device = cfg.device
    cache = run.cache if run.cache is not None else ImageCache(len(table), int(table.boxes.max()), 0, device)
    batches, frames = optics_batches(table, rows, run.batch_size, job)
    done = []
    order = range(len(batches)) if run.tasks is None else run.tasks(len(batches))

    def load(b: int):
        return cache.load(table, batches[b])

    # read ahead only while there is something to read: a batch read ahead is taken from the task pool one batch
    # early, and at a pass's end that left one rank two batches while the others had none (4 GPUs: ~0.1 s a pass)
    loaded_batches = read_ahead(load, order) if not cache.holds(rows) else ((b, load(b)) for b in order)
    # a batch's results are read (the host waits for the device) once the next batch's E-step is queued: read before
    # it (after the next batch's images were prepared), the device idled at every batch boundary while the host stored
    # them and began the next E-step (~9 ms a batch on an H100, TRPV1-like local iterations)
    pending: tuple[np.ndarray, OpticsFrame, BatchPoses, torch.Tensor | None] | None = None
    for b, loaded in loaded_batches:
        idx, frame = batches[b], frames[b]
        with timer("getFourierTransformsAndCTFs"):
            images = cache.images(idx, loaded, frame.window.box)
            norm_scale = (
                None
                if avg_norm is None
                else torch.as_tensor(avg_norm / poses_now.norm_correction[idx], dtype=torch.float32)
            )
            batch = prepare_batch(
                table,
                idx,
                frame.window,
                job.sigma2,
                job.scale.value,
                cfg.particle_diameter,
                frame.angpix,
                cfg.ctf,
                cfg.zero_mask,
                batch_generator(run.noise_key, b),
                device,
                norm_scale,
                images,
                np.stack([poses_now.origin_x_angst[idx], poses_now.origin_y_angst[idx]], -1),
                cfg.ctf_options,
                job.scale.of_particle[idx],
                offset_priors_angst(table, idx),
            )
            # at least: the images read, the transforms, CTFs and 1/σ² the E-step takes written
            outputs = (batch.f_masked, batch.f_unmasked, batch.ctf, batch.inv_sigma2)
            timer.add_bytes("images", images.nbytes + sum(t.nbytes for t in outputs))
            local_prior = None
            if job.local:
                # centred on the STAR's angle priors where it has them (RELION), else on the current angles
                local_prior = job.grid.local_candidates(
                    *angle_priors(table, idx, poses_now.rot_deg[idx], poses_now.tilt_deg[idx], poses_now.psi_deg[idx]),
                    settings.local_sigma_deg,
                )
        forced = None if job.forced_class is None else to_device(job.forced_class[idx], device)
        if job.fixed_poses:
            res = fixed_pose_batch(batch, frame, job, poses_now, idx, sums, forced, timer)
        else:
            res = expectation_batch(
                batch, frame.window, frame.coarse_shell, job.refs, frame.grid, frame.settings, sums, local_prior, timer,
                forced,
            )  # fmt: skip
        residual = None
        if res.residual_power is not None and batch.power_outside is not None:
            residual = res.residual_power + batch.power_outside
        if pending is not None:  # the last batch's, with this batch's E-step queued behind its back-projection
            done.append(store_batch_results(poses_now, *pending, run.progress))
        pending = (idx, frame, res, residual)
    if pending is not None:
        done.append(store_batch_results(poses_now, *pending, run.progress))
    return np.concatenate(done) if done else np.zeros(0, dtype=np.int64)
