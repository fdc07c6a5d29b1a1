"""RELION's auto-refine schedule: resolution, E-step windows, when to sample finer, when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..fourier.grids import relion_round
from ..reconstruction.reconstruct import MIN_REGULARISED_SHELL

MAX_ITER_WITHOUT_RESOLUTION_GAIN = 1
MAX_ITER_WITHOUT_LARGE_CHANGES = 1
LARGE_CHANGE_TOLERANCE = 1.03  # RELION: changes within 3 % of the smallest so far are not large
SMALL_CHANGE_FRACTION = (
    0.40  # RELION: nor are changes below 40 % of the (initial, see update_changes) fine sampling step
)
MAX_COARSE_OFFSET_STEP_ANGST = 1.5  # RELION: the fine offset step never exceeds 1.5 Å when the sampling gets finer
FINE_ENOUGH = 0.75  # RELION: the sampling is fine enough once its fine step is below this fraction of the accuracy


RESET_CHANGE_CLASSES = 9999999.0  # RELION's smallest_changes_optimal_classes at the start and after each finer sampling
HIGH_FSC_AT_LIMIT = 0.2  # RELION: once the FSC at the window's last shell exceeds this, the window may jump
JUMP_MIN_AVE_PMAX = 0.1  # ... by 25 % of Nyquist, but only while the mean pmax is above this (not over-marginalised)


def first_below(curve, threshold: float) -> int:
    """Index of the first value below ``threshold`` (from index 0), -1 if none (RELION's fsc05/fsc0143 search)."""
    below = [i for i, v in enumerate(curve) if v < threshold]
    return below[0] if below else -1


@dataclass
class Schedule:
    """RELION's auto-refine state between iterations (MlOptimiser's counters and sampling), updated in RELION's order:
    after an iteration's halves FSC (:meth:`update_after_halves_fsc`), its pose changes (:meth:`update_changes`) and its
    resolution (:meth:`update_resolution`); at the start of the next, :meth:`check_convergence`, the window
    (:meth:`window_shell`) and, from the second iteration on, :meth:`update_angular_sampling`."""

    healpix_order: int
    offset_range_px: float
    offset_step_px: float
    local_search: bool = False
    sigma_ang_deg: float = 0.0
    # --sigma_rot/--sigma_tilt/--sigma_psi (degrees, 0: unrestricted) until the schedule's own local searches give all
    # three sigma_ang_deg (RELION's updateAngularSampling sets sigma2_rot, _tilt and _psi alike)
    sigma_rot_tilt_psi_deg: tuple[float, float, float] | None = None
    current_resolution_shell: int = 0
    incr_size: int = 10  # RELION's incr_size: raised to the shells between FSC 0.5 and 0.143, plus 5
    has_high_fsc_at_limit: bool = False  # once set, stays set
    fine_enough: bool = False  # has_fine_enough_angular_sampling
    iter_without_resolution_gain: int = 0
    iter_without_large_changes: int = 0
    smallest_change_orientation_deg: float = 999.0
    smallest_change_offset_px: float = 999.0
    smallest_change_classes: float = RESET_CHANGE_CLASSES
    last_change_offset_px: float = 999.0  # rms 2D offset change of the last iteration (sets the next offset range)
    converged: bool = False
    final_iteration: bool = False
    # the sampling the run started with: RELION's 40 % rule compares the changes with its fine steps (update_changes)
    initial_healpix_order: int = -1
    initial_offset_step_px: float = -1.0

    def __post_init__(self):
        if self.initial_healpix_order < 0:
            self.initial_healpix_order = self.healpix_order
        if self.initial_offset_step_px < 0:
            self.initial_offset_step_px = self.offset_step_px

    @property
    def local_sigmas_deg(self) -> tuple[float, float, float]:
        """The local searches' prior σ of rot, tilt and psi (degrees); zeros for global searches."""
        if not self.local_search:
            return (0.0, 0.0, 0.0)
        if self.sigma_rot_tilt_psi_deg is not None:
            rot, tilt, psi = self.sigma_rot_tilt_psi_deg  # a list after a checkpoint's JSON
            return (rot, tilt, psi)
        return (self.sigma_ang_deg,) * 3

    def window_shell(self, box: int, ave_pmax: float) -> int:
        """E-step window of the next iteration (RELION's updateImageSizeAndResolutionPointers): the current resolution
        plus 25 % of Nyquist while the FSC reached 0.2 at a window's edge and the mean pmax is above 0.1, else plus
        incr_size; at most Nyquist, which the final iteration uses whole."""
        if self.final_iteration:
            return box // 2
        jump = (
            relion_round(0.25 * box / 2)
            if ave_pmax > JUMP_MIN_AVE_PMAX and self.has_high_fsc_at_limit
            else self.incr_size
        )
        return int(min(box // 2, self.current_resolution_shell + jump))

    @staticmethod
    def angular_step_deg(order: int) -> float:
        return 60.0 / 2**order

    def coarse_shell(self, window_shell: int, box: int, angpix: float, particle_diameter_angst: float) -> int:
        """Pass-0 window (RELION's coarse_size): the resolution the coarse angular step still resolves at the
        particle's edge, arc = step·π·D/360, with RELION's keep-safe factor 1.2 for 3D."""
        arc_angst = self.angular_step_deg(self.healpix_order) / 360.0 * math.pi * particle_diameter_angst
        return int(min(window_shell, math.ceil(box * angpix / (arc_angst / 1.2))))

    def update_after_halves_fsc(self, fsc, window_shell: int) -> None:
        """RELION (MlOptimiserMpi::iterate, after compareTwoHalves): incr_size is at least the shells between the FSC's
        first drops below 0.5 and below 0.143, plus 5; the FSC at the window's last shell decides whether windows may
        jump by 25 % of Nyquist from now on."""
        f = [float(v) for v in fsc]
        self.incr_size = max(self.incr_size, first_below(f, 0.143) - first_below(f, 0.5) + 5)
        if not self.has_high_fsc_at_limit and 0 < window_shell <= len(f):
            self.has_high_fsc_at_limit = f[window_shell - 1] > HIGH_FSC_AT_LIMIT

    def update_resolution(self, resolution_shell: int) -> None:
        """RELION's updateCurrentResolution: no gain unless the new resolution is finer than the last iteration's."""
        if resolution_shell <= self.current_resolution_shell:
            self.iter_without_resolution_gain += 1
        else:
            self.iter_without_resolution_gain = 0
        self.current_resolution_shell = resolution_shell

    def update_changes(
        self, change_orientation_deg: float, change_offset_px: float, change_classes: float = 0.0
    ) -> None:
        """RELION's counter of iterations without large pose changes (updateOverallChangesInHiddenVariables).

        ``change_orientation_deg``: RELION's symmetry-aware mean angular change (engine.angular_change_deg);
        ``change_offset_px``: the rms 2D offset change (RELION's per-coordinate rms is this / √2);
        ``change_classes``: the fraction of particles whose class changed. RELION requires it within 3 % of its
        smallest, which starts (and after each finer sampling restarts) at 9999999: the first iteration at a sampling
        never counts as small, nor, when a run assigns every particle its class in iteration 1, the second."""
        # a change is large only when it is more than 3 % below the smallest seen at this sampling, and not below 40 %
        # of the fine sampling step: of the run's first sampling, as RELION's leader measures the changes
        # (ml_optimiser_mpi.cpp, 3.1 to 5.0) with its own copy of the sampling, which only the followers refine
        fine_angle, fine_offset = self.angular_step_deg(self.initial_healpix_order) / 2, self.initial_offset_step_px / 2
        small_ang = (
            change_orientation_deg < SMALL_CHANGE_FRACTION * fine_angle
            or LARGE_CHANGE_TOLERANCE * change_orientation_deg >= self.smallest_change_orientation_deg
        )
        small_off = (
            change_offset_px / math.sqrt(2) < SMALL_CHANGE_FRACTION * fine_offset
            or LARGE_CHANGE_TOLERANCE * change_offset_px >= self.smallest_change_offset_px
        )
        small_classes = LARGE_CHANGE_TOLERANCE * change_classes >= self.smallest_change_classes
        self.iter_without_large_changes = (
            self.iter_without_large_changes + 1 if small_ang and small_off and small_classes else 0
        )
        if change_classes < self.smallest_change_classes:
            self.smallest_change_classes = float(relion_round(change_classes))
        self.smallest_change_orientation_deg = min(self.smallest_change_orientation_deg, change_orientation_deg)
        self.smallest_change_offset_px = min(self.smallest_change_offset_px, change_offset_px)
        self.last_change_offset_px = change_offset_px

    def _stalled(self) -> bool:
        return (
            self.iter_without_resolution_gain >= MAX_ITER_WITHOUT_RESOLUTION_GAIN
            and self.iter_without_large_changes >= MAX_ITER_WITHOUT_LARGE_CHANGES
        )

    def check_convergence(self) -> bool:
        """RELION's checkConvergence, at the start of an iteration: converged once the sampling was found fine enough
        and the counters have stalled since; the iteration about to run is then the final one."""
        if self.fine_enough and self._stalled():
            self.converged = self.final_iteration = True
        return self.converged

    def update_angular_sampling(
        self, accuracy_deg: float, auto_local_order: int, accuracy_offset_px: float, angpix: float
    ) -> str | None:
        """RELION's updateAngularSampling (from the second iteration on, before its E-step, also in the final one): when
        both counters have stalled, either the fine (oversampled) step is already below 0.75 of the expected angular
        accuracy (fine enough: nothing changes) or the sampling gets one HEALPix order finer, the offsets following the
        translational accuracy and the last changes, and the counters start again. Returns a note of what changed.

        ``accuracy_deg``, ``accuracy_offset_px``: RELION's expected accuracy (refine/accuracy.py) over this iteration's
        window."""
        if not self._stalled():
            return None
        fine_step = self.angular_step_deg(self.healpix_order) / 2  # the oversampled step of the fine pass
        if fine_step < FINE_ENOUGH * accuracy_deg:
            self.fine_enough = True
            return (
                f"sampling fine enough (fine step {fine_step:.2f}° < {FINE_ENOUGH} × "
                f"estimated accuracy {accuracy_deg:.2f}°)"
            )
        self.fine_enough = False
        self.healpix_order += 1
        self.offset_range_px, self.offset_step_px = self._finer_offsets(accuracy_offset_px, angpix)
        if self.healpix_order >= auto_local_order:
            self.local_search = True
            # RELION: σ = 2 × the new fine (oversampled) step, i.e. one coarse step; 3σ bounds the candidates
            self.sigma_ang_deg = 2.0 * self.angular_step_deg(self.healpix_order) / 2
            self.sigma_rot_tilt_psi_deg = None
        self.iter_without_resolution_gain = 0
        self.iter_without_large_changes = 0
        self.smallest_change_orientation_deg = 999.0
        self.smallest_change_offset_px = 999.0
        self.smallest_change_classes = RESET_CHANGE_CLASSES
        return (
            f"finer sampling: healpix order {self.healpix_order} ({self.angular_step_deg(self.healpix_order):.2f}°), "
            f"offsets {self.offset_range_px:.2f}/{self.offset_step_px:.2f} px"
            + (f", local searches sigma {self.sigma_ang_deg:.2f}°" if self.local_search else "")
        )

    def _finer_offsets(self, accuracy_offset_px: float, angpix: float) -> tuple[float, float]:
        """RELION's offset range and (coarse) step for the next sampling, in pixels: the step from the translational
        accuracy (0.75 of it, at most 1.5 Å, times 2 for the oversampling), the range five times the last per-axis rms
        change, at most 1.3 × the old range and at least 1.5 steps, halved beyond 4 steps (then the step widened);
        never a coarser step than now."""
        step = min(MAX_COARSE_OFFSET_STEP_ANGST, FINE_ENOUGH * accuracy_offset_px * angpix) * 2.0 / angpix
        rng = min(1.3 * self.offset_range_px, 5.0 * self.last_change_offset_px / math.sqrt(2))
        rng = max(rng, 1.5 * step)
        if rng > 4.0 * step:
            rng /= 2.0
        if rng > 4.0 * step:
            step = rng / 4.0
        if step > self.offset_step_px:
            return self.offset_range_px, self.offset_step_px
        return rng, step


def strict_window_shell(shell: int, box: int, angpix: float, strict_highres_angst: float) -> int:
    """--strict_highres_exp: the last shell the E-step scores, round(box·pixel size / limit) as RELION
    (but never below the first regularised shell); 0 leaves ``shell`` as it is."""
    if strict_highres_angst <= 0:
        return shell
    return int(min(shell, max(MIN_REGULARISED_SHELL, round(box * angpix / strict_highres_angst))))
