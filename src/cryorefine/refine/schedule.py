"""RELION's auto-refine schedule: resolution, E-step windows, when to sample finer, when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..reconstruction.reconstruct import MIN_REGULARISED_SHELL

MAX_ITER_WITHOUT_RESOLUTION_GAIN = 1
MAX_ITER_WITHOUT_LARGE_CHANGES = 1
LARGE_CHANGE_TOLERANCE = 1.03  # RELION: changes within 3 % of the smallest so far are not large
SMALL_CHANGE_FRACTION = 0.40  # RELION 4/5: nor are changes below 40 % of the current (fine) sampling step
MAX_COARSE_OFFSET_STEP_ANGST = 1.5  # RELION: the fine offset step never exceeds 1.5 Å when the sampling gets finer
FINE_ENOUGH = 0.75  # RELION: the sampling is fine enough once its fine step is below this fraction of the accuracy


@dataclass
class Schedule:
    healpix_order: int
    offset_range_px: float
    offset_step_px: float
    local_search: bool = False
    sigma_ang_deg: float = 0.0
    current_resolution_shell: int = 0
    best_resolution_shell: int = 0
    iter_without_resolution_gain: int = 0
    iter_without_large_changes: int = 0
    smallest_change_orientation_deg: float = 999.0
    smallest_change_offset_px: float = 999.0
    last_change_offset_px: float = 999.0  # rms 2D offset change of the last iteration (sets the next offset range)
    converged: bool = False
    final_iteration: bool = False

    def window_shell(self, box: int, incr_size: int) -> int:
        """E-step window: the current resolution shell plus ``incr_size`` shells, at most Nyquist."""
        if self.final_iteration:
            return box // 2
        return int(min(box // 2, self.current_resolution_shell + incr_size))

    @staticmethod
    def angular_step_deg(order: int) -> float:
        return 60.0 / 2**order

    def coarse_shell(self, window_shell: int, box: int, angpix: float, particle_diameter_angst: float) -> int:
        """Pass-0 window (RELION's coarse_size): the resolution the coarse angular step still resolves at the
        particle's edge, arc = step·π·D/360, with RELION's keep-safe factor 1.2 for 3D."""
        arc_angst = self.angular_step_deg(self.healpix_order) / 360.0 * math.pi * particle_diameter_angst
        return int(min(window_shell, math.ceil(box * angpix / (arc_angst / 1.2))))

    def update_changes(self, resolution_shell: int, change_orientation_deg: float, change_offset_px: float) -> None:
        """RELION's counters of iterations without resolution gain and without large pose changes.

        ``change_offset_px``: the rms 2D offset change (RELION's per-coordinate rms is this / √2)."""
        self.current_resolution_shell = resolution_shell
        if resolution_shell > self.best_resolution_shell:
            self.best_resolution_shell = resolution_shell
            self.iter_without_resolution_gain = 0
        else:
            self.iter_without_resolution_gain += 1
        # RELION (updateOverallChangesInHiddenVariables): a change is large only when it is more than 3 % below the
        # smallest seen at this sampling, and (RELION 4/5) not below 40 % of the fine sampling step
        fine_angle, fine_offset = self.angular_step_deg(self.healpix_order) / 2, self.offset_step_px / 2
        small_ang = (change_orientation_deg < SMALL_CHANGE_FRACTION * fine_angle
                     or LARGE_CHANGE_TOLERANCE * change_orientation_deg >= self.smallest_change_orientation_deg)
        small_off = (change_offset_px / math.sqrt(2) < SMALL_CHANGE_FRACTION * fine_offset
                     or LARGE_CHANGE_TOLERANCE * change_offset_px >= self.smallest_change_offset_px)
        self.iter_without_large_changes = self.iter_without_large_changes + 1 if small_ang and small_off else 0
        self.smallest_change_orientation_deg = min(self.smallest_change_orientation_deg, change_orientation_deg)
        self.smallest_change_offset_px = min(self.smallest_change_offset_px, change_offset_px)
        self.last_change_offset_px = change_offset_px

    def advance(self, accuracy_deg: float, auto_local_order: int, accuracy_offset_px: float, angpix: float, max_order: int = 8) -> str | None:
        """After an iteration: sample finer or declare convergence. Returns a note of what changed.

        ``accuracy_deg``, ``accuracy_offset_px``: RELION's expected accuracy (refine/accuracy.py). As RELION's
        updateAngularSampling: once a fine (oversampled) step is below 0.75 of the angular accuracy, finer sampling
        gains nothing; when sampling finer, the offsets follow the translational accuracy and the last changes.
        """
        stalled = self.iter_without_resolution_gain >= MAX_ITER_WITHOUT_RESOLUTION_GAIN and self.iter_without_large_changes >= MAX_ITER_WITHOUT_LARGE_CHANGES
        if not stalled:
            return None
        fine_step = self.angular_step_deg(self.healpix_order) / 2  # the oversampled step of the fine pass
        if fine_step < FINE_ENOUGH * accuracy_deg or self.healpix_order >= max_order:
            self.converged = True
            return f"converged (fine step {fine_step:.2f}° < {FINE_ENOUGH} × estimated accuracy {accuracy_deg:.2f}°)"
        self.healpix_order += 1
        self.offset_range_px, self.offset_step_px = self._finer_offsets(accuracy_offset_px, angpix)
        if self.healpix_order >= auto_local_order:
            self.local_search = True
            # RELION: σ = 2 × the new fine (oversampled) step, i.e. one coarse step; 3σ bounds the candidates
            self.sigma_ang_deg = 2.0 * self.angular_step_deg(self.healpix_order) / 2
        self.iter_without_resolution_gain = 0
        self.iter_without_large_changes = 0
        self.smallest_change_orientation_deg = 999.0
        self.smallest_change_offset_px = 999.0
        return f"finer sampling: healpix order {self.healpix_order} ({self.angular_step_deg(self.healpix_order):.2f}°), offsets {self.offset_range_px:.2f}/{self.offset_step_px:.2f} px" + (f", local searches sigma {self.sigma_ang_deg:.2f}°" if self.local_search else "")

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
