"""Adaptive memory (the paper's adaptive allocation): predicted bytes of an E-step tile and of the fixed volumes.

A tile is m particles of a batch going through the coarse pass (getAllSquaredDifferences, pass 0), the
significant set, the fine pass and storeWeightedSums (expectation.py). Each function bounds the live bytes
at a stage's peak, counted from the shapes that stage allocates (float32 / complex64 tensors, int64
indices). The per-element constants are upper bounds of measured peaks (CPU values in brackets, the rest is
headroom for the GPU's sort and cuBLAS); tests/estep/test_memory.py measures them again on the CPU and, with
torch.cuda.max_memory_allocated, on the GPU.

Units: bytes. K classes, T coarse translations, L coarse rotation slots per particle (all R rotations, or
the local candidates), jc coarse-window pixels, J full-window pixels, G8 fine rotations (8 per significant
(class, coarse rotation) pair in the tile's union), L8 fine rotation slots of one particle (8 per pair),
T4 fine translations (4 per coarse one). P = pad·box; the volumes are stored on grids of edge S <= P (windowed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CryoInputError
from ..io.image_cache import host_free_bytes
from ..projection.extract import MAX_POINTS
from ..reconstruction import padded_fft, symmetrise
from ..reconstruction.reconstruct import gridding_grid_size
from ..tiling import TileTooLarge

# coarse pass + significance, per particle
COARSE_BYTES_PER_IMAGE_PIXEL = 32  # per (translation, coarse pixel): shifted image, phases, real operand [22]
COARSE_BYTES_PER_SAMPLE = (
    72  # per (class, translation, rotation): diff2, softmax/sort/cumsum, significant indices [25; 63 all significant]
)
COARSE_BYTES_PER_PARTICLE_PIXEL = 32  # per window pixel: w, sC and the fine pass's per-particle rows
# coarse pass, per tile
COARSE_BYTES_PER_PROJECTION_PIXEL = (
    4  # per (rotation, coarse pixel): |P|² (the Re/Im planes are the extraction's output)
)
COARSE_BYTES_PER_PREVIOUS_CLASS_PIXEL = 8  # with K > 1: the previous class's Re/Im planes, alive beside the next
LOCAL_BYTES_PER_GATHERED_ELEMENT = 20  # local searches: gathered candidate slices (complex), real operand, |P|²
LOCAL_GATHER_ELEMENTS = (
    1 << 26
)  # elements per gathered (particles × candidates × pixels) block of the local coarse pass
# fine pass + storeWeightedSums, per particle of a fine chunk
FINE_BYTES_PER_SLOT_PIXEL = 36  # per (fine rotation slot, pixel): gathered projections, |P|², operands, Σ_t Γ X̃ [28]
FINE_BYTES_PER_IMAGE_PIXEL = 48  # per (fine translation, pixel): X̃ masked and unmasked, phases, operands, Σ_r Γ P [32]
FINE_BYTES_PER_SAMPLE = 20  # per (fine translation, fine rotation slot): cross term, log-posterior, masks, Γ [13]
# the tile's union of fine rotations, and slice extraction
UNION_BYTES_PER_ROTATION_PIXEL = (
    20  # per (fine rotation, pixel): projections (complex), data (complex) and weight accumulators
)
PROJECTION_BYTES_PER_POINT = (
    24  # output of a slice extraction: Re/Im planes, their contiguous copies and the complex64 [21]
)
PLANAR_PROJECTION_BYTES_PER_POINT = 8  # output of a planar slice extraction (the coarse pass): Re/Im planes
INTERPOLATION_BYTES_PER_POINT = (
    48  # grid_sample's temporaries per point: coordinates, the flipped grid, Re/Im, conj sign [46]
)

# fixed volumes, per voxel of the stored grid (S²(S/2+1); S = P unless windowed)
REFERENCE_BYTES_PER_VOXEL = 8  # padded transform, complex64
BACKPROJECTOR_BYTES_PER_VOXEL = 12  # data complex64 + weight float32
# the M-step beyond its accumulators
RECONSTRUCT_BYTES_PER_CUBE_VOXEL = 48  # reconstruct()'s float64/complex128 work on the window's cube [32-37]
MAP_BYTES_PER_VOXEL = 24  # reconstruct()'s real-space map (float64), its gridding correction and the corrected copy
SLAB_TEMPORARIES = 6  # padded_fft's slab temporaries and the blob factor's rows, in padded_fft.slab_bytes
SYMMETRISE_BYTES_PER_VOXEL = 24  # symmetrise_backprojector() with a point group other than C1: the new sums [24]
SYMMETRISE_BYTES_PER_CHUNK_VOXEL = 400  # and one chunk's interpolation [366]
JOINED_BYTES_PER_VOXEL = 12  # the final iteration's one joined accumulator

# an E-step batch (prepare_batch: images read, transformed, masked, windowed), per image pixel (box²) [46]
BATCH_BYTES_PER_IMAGE_PIXEL = 56

# of the memory the process may use (the device's, or its --gpu_memory cap), held back for cuBLAS/cuFFT workspaces
# and fragmentation
SAFETY_FRACTION = 0.05
SAFETY_MIN_BYTES = 256 << 20
IMAGE_CACHE_FRACTION = 0.25  # of the GPU's memory, at most, for the particle images kept there (io/image_cache.py)
HOST_BUDGET_BYTES = 2 << 30  # CPU: bytes a tile may allocate at least (or half the free host memory, if more)
GIB = float(1 << 30)


@dataclass(frozen=True)
class TileShape:
    """The sizes that set an E-step tile's memory, besides its particle count."""

    classes: int  # K
    translations: int  # T coarse translations
    rotation_slots: int  # L coarse rotations scored per particle
    rotations: int  # R coarse rotations of the grid (local searches project the candidates' union, at most R)
    coarse_pixels: int  # jc
    window_pixels: int  # J
    local: bool = False


def projection_bytes(rotations: int, pixels: int, planar: bool = False) -> int:
    """extract_central_slices (``planar``: extract_central_slices_planar) of rotations × pixels points: the output,
    and the interpolation of one chunk."""
    points = rotations * pixels
    per_point = PLANAR_PROJECTION_BYTES_PER_POINT if planar else PROJECTION_BYTES_PER_POINT
    return per_point * points + INTERPOLATION_BYTES_PER_POINT * min(points, MAX_POINTS)


def coarse_bytes(m: int, s: TileShape) -> int:
    """Peak of the coarse pass and the significant set for a tile of ``m`` particles.

    Per particle: the shifted coarse images (T × jc) and every coarse sample (K × T × L), counted as if all were
    significant (the index arrays of the significant set are sized by them). Per tile: one class's coarse
    projections (all R, or the candidates' union) beside the previous class's, and their interpolation.
    """
    per_particle = (
        COARSE_BYTES_PER_IMAGE_PIXEL * s.translations * s.coarse_pixels
        + COARSE_BYTES_PER_SAMPLE * s.classes * s.translations * s.rotation_slots
        + COARSE_BYTES_PER_PARTICLE_PIXEL * s.window_pixels
    )
    projected = min(s.rotations, m * s.rotation_slots) if s.local else s.rotations
    per_pixel = COARSE_BYTES_PER_PROJECTION_PIXEL + (COARSE_BYTES_PER_PREVIOUS_CLASS_PIXEL if s.classes > 1 else 0)
    per_tile = projection_bytes(projected, s.coarse_pixels, planar=True) + per_pixel * projected * s.coarse_pixels
    if s.local:
        block = min(
            m * s.rotation_slots * s.coarse_pixels, max(s.rotation_slots * s.coarse_pixels, LOCAL_GATHER_ELEMENTS)
        )
        per_tile += LOCAL_BYTES_PER_GATHERED_ELEMENT * block
    return m * per_particle + per_tile


def union_bytes(fine_rotations: int, window_pixels: int) -> int:
    """The tile's fine projections (G8 × J) and back-projection accumulators, alive through the fine pass."""
    return UNION_BYTES_PER_ROTATION_PIXEL * fine_rotations * window_pixels


def fine_projection_bytes(fine_rotations: int, window_pixels: int) -> int:
    """Peak while the fine projections are made: the array being filled and one extraction."""
    return 8 * fine_rotations * window_pixels + projection_bytes(fine_rotations, window_pixels)


def fine_chunk_bytes(m: int, fine_translations: int, fine_slots: int, window_pixels: int) -> int:
    """Peak of the fine pass and storeWeightedSums for ``m`` particles of T4 fine translations × L8 rotation slots."""
    per_particle = (
        FINE_BYTES_PER_SLOT_PIXEL * fine_slots * window_pixels
        + FINE_BYTES_PER_IMAGE_PIXEL * fine_translations * window_pixels
        + FINE_BYTES_PER_SAMPLE * fine_translations * fine_slots
    )
    return m * per_particle


def largest_fitting(n: int, budget: int, bytes_of) -> int:
    """The largest m of n, ⌈n/2⌉, ⌈n/4⌉ ... 1 with bytes_of(m) <= budget; 0 if not even 1 fits."""
    m = n
    while True:
        if bytes_of(m) <= budget:
            return m
        if m == 1:
            return 0
        m = (m + 1) // 2


def particles_per_tile(n: int, budget: int, s: TileShape) -> int:
    """Particles per coarse tile of a batch of ``n``; at least 1 (one particle that cannot fit fails later, clearly)."""
    return max(1, largest_fitting(n, budget, lambda m: coarse_bytes(m, s)))


def fine_particles_per_chunk(
    n: int, budget: int, fine_rotations: int, fine_translations: int, fine_slots: int, window_pixels: int
) -> int:
    """Particles per fine-pass chunk of a tile of ``n``; raises TileTooLarge when the union and one particle cannot
    fit."""
    union = union_bytes(fine_rotations, window_pixels)
    m = largest_fitting(n, budget - union, lambda k: fine_chunk_bytes(k, fine_translations, fine_slots, window_pixels))
    making = fine_projection_bytes(fine_rotations, window_pixels)
    if m == 0 or making > budget:
        need = max(union + fine_chunk_bytes(1, fine_translations, fine_slots, window_pixels), making)
        raise TileTooLarge(
            f"the fine pass of {n} particle(s) needs {need / GIB:.2f} GiB ({fine_rotations} fine rotations × "
            f"{window_pixels} pixels) but {max(budget, 0) / GIB:.2f} GiB are free; use a coarser sampling "
            "(--healpix_order), fewer classes, the CPU (drop --gpu) or a GPU with more memory"
        )
    return m


# ------------------------------------------------------------------ fixed volumes


def grid_voxels(size: int) -> int:
    """S²(S/2+1), the voxels of a stored padded half grid of edge S."""
    return size * size * (size // 2 + 1)


def estep_volume_bytes(grid_size: int, references: int, backprojectors: int) -> dict[str, int]:
    """Device bytes of the E-step's volumes on a stored grid of edge ``grid_size`` (extract.window_grid_size):
    ``references`` padded transforms alive at once (1, a half set's, in auto-refine; K in classification) and
    ``backprojectors`` accumulators (2 half sets, or K classes)."""
    v = grid_voxels(grid_size)
    return {
        "references": REFERENCE_BYTES_PER_VOXEL * v * references,
        "backprojectors": BACKPROJECTOR_BYTES_PER_VOXEL * v * backprojectors,
    }


def estep_volumes_total(grid_size: int, references: int, backprojectors: int) -> int:
    """The sum of :func:`estep_volume_bytes`: the E-step's volumes' device bytes."""
    return sum(estep_volume_bytes(grid_size, references, backprojectors).values())


def halves_volume_bytes(grid_size: int) -> int:
    """Auto-refine's E-step volumes with both half sets' accumulators on the device: one reference and two
    back-projectors on the grid of edge ``grid_size``."""
    return estep_volumes_total(grid_size, references=1, backprojectors=2)


def park_finished_half(free: int, grid_size: int) -> bool:
    """Auto-refine's last volume rung: whether half set 1's back-projector waits in host memory while half set 2 is
    scored, so that the GPU holds one reference and one back-projector instead of one and two. Taken when
    halves_volume_bytes would take more than half of the ``free`` bytes (the E-step's tiles keep at least the other
    half); the copy out and back, 12 bytes a voxel each way, is small beside an iteration at such sizes."""
    return halves_volume_bytes(grid_size) > free // 2


def references_on_host(free: int, grid_size: int, classes: int) -> bool:
    """Classification's last volume rung: whether the K padded references wait in pinned host memory, each copied to
    the GPU when the E-step projects its class (engine.HostReferences), so that the GPU holds K back-projectors and at
    most two references (one being scored, the next arriving) instead of K of each. Taken only where K of each would
    not fit the ``free`` bytes (the copies, K per pass of a tile, cost time) and the smaller set does."""
    if classes < 3 or estep_volumes_total(grid_size, classes, classes) <= free:
        return False
    return estep_volumes_total(grid_size, 2, classes) <= free


def _cube(pad: int, grid_size: int, max_shell: int) -> tuple[int, int]:
    """(n, m): reconstruct()'s cube (n, n, m) for padded radii up to ``max_shell``·pad on a grid of edge ``grid_size``
    (reconstruct._hermitian_window)."""
    h = math.ceil(max_shell * pad) + 1
    return (grid_size, grid_size // 2 + 1) if h >= grid_size // 2 else (2 * h + 1, h + 1)


def reconstruct_bytes(box: int, pad: int, grid_size: int, max_shell: int) -> int:
    """Peak of one reconstruct() beyond its accumulators: float64 work on the cube of the padded radii up to
    ``max_shell``·pad (reconstruct._hermitian_window; the stored grid when it reaches its edge), padded_fft's
    buffer and slab temporaries (transform_buffer_bytes) and the (d, d, d) real-space map's float64 copies."""
    n, m = _cube(pad, grid_size, max_shell)
    cube = RECONSTRUCT_BYTES_PER_CUBE_VOXEL * n * n * m
    return cube + transform_buffer_bytes(box, pad, grid_size, max_shell) + MAP_BYTES_PER_VOXEL * box**3


def transform_buffer_bytes(box: int, pad: int, grid_size: int, max_shell: int) -> int:
    """Bytes of reconstruct()'s padded transforms (where its cube's work is elsewhere, the host, these are what the
    GPU holds): padded_fft's buffer, G × G × m for the gridding iterations on RELION's grid of edge G
    (gridding_grid_size) or d × d × m for the final inverse transform, and the slab temporaries of the larger of the
    two grids (G, P = pad·d)."""
    _, m = _cube(pad, grid_size, max_shell)
    g = gridding_grid_size(pad, max_shell)
    edge = max(g, box)
    return 16 * edge * edge * m + SLAB_TEMPORARIES * padded_fft.slab_bytes(max(g, box * pad), m)


def mstep_bytes(box: int, pad: int, grid_size: int, max_shell: int, symmetry: bool, join_bytes_per_voxel: int) -> int:
    """The M-step's peak beyond the accumulators it is given: symmetrising them (a point group other than C1), or
    ``join_bytes_per_voxel`` of the stored grid (JOINED_BYTES_PER_VOXEL: the final iteration's joined halves; 0
    otherwise: the halves are joined at low resolution in place) beside one reconstruction up to ``max_shell``."""
    v = grid_voxels(grid_size)
    joined = join_bytes_per_voxel * v + reconstruct_bytes(box, pad, grid_size, max_shell)
    chunk = min(v, symmetrise.SYMMETRISE_CHUNK)
    symmetrised = SYMMETRISE_BYTES_PER_VOXEL * v + SYMMETRISE_BYTES_PER_CHUNK_VOXEL * chunk
    return max(symmetrised if symmetry else 0, joined)


def batch_fitting(budget: int, box: int, batch: int) -> int:
    """Particles per E-step batch of ``box`` images that take at most half of ``budget`` bytes (the tiles keep the
    other half): ``batch`` or fewer, a multiple of 32 (at least 32)."""
    fits = budget // 2 // (BATCH_BYTES_PER_IMAGE_PIXEL * box * box)
    return max(32, min(batch, fits // 32 * 32))


def check_estep_volumes(box: int, pad: int, grid_size: int, references: int, backprojectors: int, free: int) -> None:
    """Raise CryoInputError (one line: the sizes, the free memory, the fixes) when the E-step's volumes on a grid of
    edge ``grid_size`` exceed ``free`` bytes."""
    sizes = estep_volume_bytes(grid_size, references, backprojectors)
    need = sum(sizes.values())
    if need <= free:
        return
    window = "whole" if grid_size == box * pad else f"windowed to {grid_size} of {box * pad} padded voxels"
    raise CryoInputError(
        f"the GPU cannot hold the E-step's volumes at box {box}, --pad {pad} ({window}): {references} padded "
        f"reference(s) {sizes['references'] / GIB:.2f} GiB + {backprojectors} back-projector(s) "
        f"{sizes['backprojectors'] / GIB:.2f} GiB = {need / GIB:.2f} GiB, but {max(free, 0) / GIB:.2f} GiB are free; "
        "use a smaller --pad (e.g. --pad 1), fewer classes, the CPU (drop --gpu) or a GPU with more memory"
    )


# ------------------------------------------------------------------ the device


def _cuda_index(device) -> torch.device | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:  # plain "cuda": the current device (the per-process cap needs an index)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def available_bytes(device) -> int | None:
    """Bytes that may be allocated on ``device`` now: free device memory plus the allocator's unused cache, within
    any per-process cap (torch.cuda.set_per_process_memory_fraction), less a safety margin. None on the CPU."""
    device = _cuda_index(device)
    if device is None:
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    reusable = free + torch.cuda.memory_reserved(device) - allocated
    allowed = int(torch.cuda.get_per_process_memory_fraction(device) * total)  # the cap (--gpu_memory), else all
    return min(reusable, allowed - allocated) - max(SAFETY_MIN_BYTES, int(SAFETY_FRACTION * allowed))


def image_cache_bytes(device, fixed_bytes: int, sharing: int = 1) -> int:
    """Bytes the particle images may keep on ``device`` (io/image_cache.py): IMAGE_CACHE_FRACTION of its memory
    (within a per-process cap), and at most half of what stays available once the ``fixed_bytes`` (estep_volume_bytes)
    are allocated, so that the E-step's tiles keep the other half; divided between ``sharing`` ranks on one GPU.
    0 on the CPU (host memory must not grow with the number of particles)."""
    index = _cuda_index(device)
    if index is None:
        return 0
    total = torch.cuda.get_per_process_memory_fraction(index) * torch.cuda.mem_get_info(index)[1]
    available = available_bytes(index)
    assert available is not None  # on a GPU
    left = available - fixed_bytes
    return max(0, int(min(IMAGE_CACHE_FRACTION * total, left / 2) / max(1, sharing)))


def tile_budget(device) -> int:
    """Bytes an E-step tile may allocate: available_bytes on a GPU; on the CPU half the free host memory, at least
    HOST_BUDGET_BYTES (the host has no allocator to ask; this bounds the temporaries without starving a tile)."""
    free = available_bytes(device)
    if free is not None:
        return free
    return max(HOST_BUDGET_BYTES, host_free_bytes() // 2)
