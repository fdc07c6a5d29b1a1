"""Side by side, iteration by iteration: an auto-refine run of cryorefine and one of RELION 3.1.3, and where they part.

usage: python bench/trajectory.py OURS_DIR RELION_DIR [--o OUT.md] [--json OUT.json] [--root run]
       [--input particles.star]

Both folders hold RELION-named files (ROOT_itNNN_{optimiser,sampling,data}.star, ROOT_itNNN_half{1,2}_model.star; the
last iteration also ROOT_model.star / ROOT_data.star). Runs of different lengths and missing or half-written files are
tolerated: every column is filled from whatever files are there.

Per iteration N and program (cells "ours / RELION"); the sampling, window and expected accuracy are those iteration N
used (see ALIGNMENT), the rest is what iteration N produced:
  sampling      HEALPix order (sampling.star rlnHealpixOrder; the coarse pass, the fine pass is one order finer),
                angular step rlnPsiStep (°), offset range / step (Å: both write Å in sampling.star), global or local
                (model.star rlnOrientationalPriorMode > 0 and rlnSigmaPriorRotAngle > 0; older runs of ours:
                sampling.star rlnIsLocalSearch) with the prior's σ (°)
  resolution    model.star rlnCurrentResolution (Å) and its Fourier shell box·apix/res; the E-step window
                rlnCurrentImageSize/2 (shells)
  particles     means of data.star rlnNrOfSignificantSamples and rlnMaxValueProbDistribution
  changes       from consecutive data.star files, for both programs by RELION 3.1.3's own definitions
                (HiddenVariableMonitor / MlOptimiser::monitorHiddenVariableChanges): the angular change is
                HealpixSampling::calculateAngularDistance (C1: the mean over the three rows of the Euler matrices of
                the angle between them; for a symmetric run RELION takes the smallest over the symmetry mates, this
                script does not), averaged over particles; the offset change sqrt(Σ(Δx²+Δy²) / (2N)) in Å
                (a per-axis rms); and RELION's own optimiser.star rlnChangesOptimalOrientations / ...Offsets
  accuracy      model.star data_model_classes rlnAccuracyRotations (°), rlnAccuracyTranslationsAngst (Å) (half 1's:
                RELION 3.1.3 writes 0 into half 2's)
  σ_offset      model.star rlnSigmaOffsetsAngst (Å), the mean of the two half model.star files
  σ² noise      ratio ours/RELION of data_model_group_1 rlnSigma2Noise at 1/4, 1/2, 3/4 of the E-step window (the
                smaller of the two programs' windows of that iteration), both in RELION's units (see UNITS below)
  τ², SSNR, FSC at the shells where RELION's half-set FSC (rlnGoldStandardFsc) last stays >= 0.8, 0.5, 0.143: the
                τ² ratio (rlnReferenceTau2), rlnSsnrMap and rlnGoldStandardFsc of both
  Spectra are the mean of the two half model.star files: RELION keeps σ², τ² per half set; cryorefine writes one σ²
  (from both halves) and the τ² of its half 2 into both files.

UNITS. cryorefine's transforms are unnormalised (src/cryorefine/fourier/grids.py: norm="backward", the central slice of
the volume's 3D transform equals the 2D transform of its projection). RELION's forward FFT divides by the number of
real-space pixels (src/fftw.cpp, FourierTransformer::Transform: `DIRECT_MULTIDIM_ELEM(fFourier,n) /= size` with
size = MULTIDIM_SIZE(*fReal)), so an image coefficient is ours / box²; its 3D reference is put in the same units
(src/projector.cpp, Projector::computeFourierTransformMap: normfft = pad³·ori_size for a 3D map and 2D data, on top of
the (pad·box)³ of the padded FFT, i.e. ours / box²). σ² (mstep/noise.py: ⟨|X − sCP|²⟩/2 per shell) and τ²
(mstep/tau2.py: T·SSNR / ⟨pad³·Σ CTF²/σ²⟩, RELION's BackProjector::updateSSNRarrays) are powers of those coefficients:
ours / box⁴. cryorefine's model.star holds them in RELION's units (refine/relion_files.py relion_power); runs it wrote
before (their sampling.star still has rlnIsLocalSearch) hold its own, and those are divided by box⁴ here.

ALIGNMENT. RELION 3.1.3 decides iteration N's sampling, window and expected accuracy at its start ("Auto-refine:
Iteration= N" in its stdout, before "Expectation iteration N") and writes them into iteration N's files. cryorefine
has written them at the end of iteration N, for N+1, into iteration N's files (its schedule is being moved to RELION's
order). For ours, the sampling (with the expected accuracy that decided it) and the window are each read from the
files of iteration N - shift, the shift found from run.log (its "iter N: ... hpK global, window W" lines say what
iteration N used, and override the files for order, search and window), 0 without a log. With shift 1, iteration 1's
offsets and accuracy of ours are in no file.

The two runs part at the first iteration >= 1 present in both where the HEALPix order, global/local or the offset step
differ, the resolution differs by more than one Fourier shell, or the window by more than 2 shells.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

try:
    from cryorefine.io.star import read_star as _read_star
except ImportError:  # outside the project's environment: the starfile package directly
    import pandas as pd
    import starfile

    def _read_star(path):
        blocks = starfile.read(path, always_dict=True)
        return {k: (v if isinstance(v, pd.DataFrame) else pd.DataFrame([v])) for k, v in blocks.items()}


FSC_THRESHOLDS = (0.8, 0.5, 0.143)
WINDOW_FRACTIONS = (0.25, 0.5, 0.75)
PROGRAMS = ("ours", "relion")


# ---------------------------------------------------------------------------------------------------- reading
def read_star(path: Path):
    """{block: DataFrame} or None where the file is missing, empty or unreadable (a run still writing it)."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        return _read_star(path)
    except Exception:  # noqa: BLE001 - a half-written file counts as missing
        return None


def _num(value):
    """A finite float, or None (missing, 'inf', text)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _general(blocks, name: str) -> dict:
    if not blocks or name not in blocks or len(blocks[name]) == 0:
        return {}
    return blocks[name].iloc[0].to_dict()


def _column(blocks, block: str, label: str):
    if not blocks or block not in blocks or label not in blocks[block].columns:
        return None
    return blocks[block]


def _spectrum(blocks, block: str, label: str) -> dict[int, float] | None:
    """{spectral index: value} of a model.star loop block."""
    t = _column(blocks, block, label)
    if t is None:
        return None
    idx = t["rlnSpectralIndex"].to_numpy().astype(int) if "rlnSpectralIndex" in t.columns else np.arange(len(t))
    vals = t[label].to_numpy(dtype=float)
    return {int(i): float(v) for i, v in zip(idx, vals)}


def _mean_spectrum(spectra: list) -> dict[int, float] | None:
    """The mean over the half sets' spectra (the shells all of them have)."""
    spectra = [x for x in spectra if x]
    if not spectra:
        return None
    shells = set.intersection(*(set(x) for x in spectra))
    return {i: float(np.mean([x[i] for x in spectra])) for i in sorted(shells)}


def _resolution_shell(box, apix, resolution) -> float | None:
    """box·apix/resolution; 0 for RELION's 'inf' (no resolution yet), None where unknown."""
    res = _num(resolution)
    if not box or not apix or resolution is None:
        return None
    if res is None:
        return (
            0.0
            if str(resolution).strip().lower() in ("inf", "+inf", "infinity") or resolution == float("inf")
            else None
        )
    return box * apix / res


def particles_block(blocks):
    if not blocks:
        return None
    if "particles" in blocks:
        return blocks["particles"]
    for name, t in blocks.items():  # RELION 3.0 layout: one unnamed block
        if "rlnAngleRot" in t.columns:
            return t
    return None


def iterations_present(d: Path, root: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(root)}_it(\d{{3,}})_(optimiser|sampling|data|half1_model|half2_model)\.star$")
    return sorted({int(m.group(1)) for p in d.iterdir() if (m := pat.match(p.name))})


# ---------------------------------------------------------------------------------------------------- pose changes
def euler_matrices(rot, tilt, psi) -> np.ndarray:
    """RELION's Euler_angles2matrix, (N, 3, 3), angles in degrees."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=float)) for x in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack(
        [
            np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
            np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
            np.stack([sc, ss, cb], -1),
        ],
        -2,
    )


def relion_angular_distance(r0, t0, p0, r1, t1, p1) -> np.ndarray:
    """HealpixSampling::calculateAngularDistance in C1 (3D): the mean over the 3 rows of the Euler matrices of the
    angle between the rows (°)."""
    A, B = euler_matrices(r0, t0, p0), euler_matrices(r1, t1, p1)
    cos = np.clip((A * B).sum(-1), -1.0, 1.0)  # (N, 3): row i of A · row i of B
    return np.degrees(np.arccos(cos)).mean(-1)


def pose_changes(prev, cur) -> dict | None:
    """RELION 3.1.3's changes between two data.star particle tables: mean angular distance (°) and
    sqrt(Σ(Δx²+Δy²)/(2N)) (Å); particles matched by rlnImageName (else by row)."""
    if prev is None or cur is None:
        return None
    need = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if any(c not in prev.columns or c not in cur.columns for c in need):
        return None
    if "rlnImageName" in prev.columns and "rlnImageName" in cur.columns:
        a = prev.drop_duplicates("rlnImageName").set_index("rlnImageName")
        b = cur.drop_duplicates("rlnImageName").set_index("rlnImageName")
        common = a.index.intersection(b.index)
        if len(common) == 0:
            return None
        a, b = a.loc[common], b.loc[common]
    elif len(prev) == len(cur):
        a, b = prev, cur
    else:
        return None
    ang = relion_angular_distance(
        a.rlnAngleRot, a.rlnAngleTilt, a.rlnAnglePsi, b.rlnAngleRot, b.rlnAngleTilt, b.rlnAnglePsi
    )
    out = {"angle_deg": float(np.mean(ang)), "n": int(len(a))}
    if all(c in a.columns and c in b.columns for c in ("rlnOriginXAngst", "rlnOriginYAngst")):
        dx = b.rlnOriginXAngst.to_numpy(float) - a.rlnOriginXAngst.to_numpy(float)
        dy = b.rlnOriginYAngst.to_numpy(float) - a.rlnOriginYAngst.to_numpy(float)
        out["offset_angst"] = float(np.sqrt(np.sum(dx**2 + dy**2) / (2.0 * len(a))))
    return out


# ---------------------------------------------------------------------------------------------------- one run
class Run:
    """The files of one program's run, read lazily and kept."""

    def __init__(self, d: Path, root: str, name: str):
        self.dir, self.root, self.name = Path(d), root, name
        self.iterations = iterations_present(self.dir, root) if self.dir.is_dir() else []
        self._cache: dict[str, object] = {}
        # The final iteration: cryorefine writes run_itNNN_* and run_model.star for it; RELION 3.1.3 writes only
        # run_{model,data,sampling}.star (its last run_itNNN_* is the iteration before). A run_model.star that differs
        # from the last iteration's model.star is that extra iteration.
        self.final_only = None  # the iteration number of a final iteration written without run_itNNN_* files
        self.final_iteration = None
        if self.star(None, "model") is not None:
            last = self.iterations[-1] if self.iterations else None
            if last is None or self._differs_from_final(last):
                self.final_only = (last or 0) + 1
                self.iterations.append(self.final_only)
            self.final_iteration = self.iterations[-1]

    def _differs_from_final(self, it: int) -> bool:
        mine = _general(self.star(it, "half1_model"), "model_general")
        final = _general(self.star(None, "model"), "model_general")
        if not mine:
            return False
        return any(str(mine.get(k)) != str(final.get(k)) for k in ("rlnCurrentResolution", "rlnCurrentImageSize"))

    def star(self, it: int | None, kind: str):
        if it is not None and it == self.final_only:
            kind = {"half1_model": "model", "data": "data", "sampling": "sampling"}.get(kind)
            if kind is None:  # no half2 model.star, no optimiser.star
                return None
            it = None
        name = f"{self.root}_{kind}.star" if it is None else f"{self.root}_it{it:03d}_{kind}.star"
        if name not in self._cache:
            self._cache[name] = read_star(self.dir / name)
        return self._cache[name]

    def particles(self, it: int | None):
        return particles_block(self.star(it, "data"))

    def record(self, it: int) -> dict:
        """Everything the tables show for iteration ``it`` (None where a file or label is missing)."""
        sampling = _general(self.star(it, "sampling"), "sampling_general")
        model = self.star(it, "half1_model")
        general = _general(model, "model_general")
        classes = _general(model, "model_classes")
        opt = _general(self.star(it, "optimiser"), "optimiser_general")
        parts = self.particles(it)
        box, apix = _num(general.get("rlnOriginalImageSize")), _num(general.get("rlnPixelSize"))
        res = _num(general.get("rlnCurrentResolution"))
        size = _num(general.get("rlnCurrentImageSize"))
        r = {
            "healpix_order": None
            if _num(sampling.get("rlnHealpixOrder")) is None
            else int(_num(sampling.get("rlnHealpixOrder"))),
            "angular_step_deg": _num(sampling.get("rlnPsiStep")),
            "offset_range_angst": _num(sampling.get("rlnOffsetRange")),
            "offset_step_angst": _num(sampling.get("rlnOffsetStep")),
            "box": None if box is None else int(box),
            "angpix": apix,
            "resolution_angst": res,
            "resolution_shell": _resolution_shell(box, apix, general.get("rlnCurrentResolution")),
            "window_shells": None if size is None else size / 2.0,
            "mean_significant": None,
            "mean_max_prob": None,
            "accuracy_rotation_deg": _num(classes.get("rlnAccuracyRotations")),
            "accuracy_translation_angst": _num(classes.get("rlnAccuracyTranslationsAngst")),
            "sigma_offset_angst": _num(general.get("rlnSigmaOffsetsAngst")),
            "own_change_orientation_deg": _num(opt.get("rlnChangesOptimalOrientations")),
            "own_change_offset_angst": _num(opt.get("rlnChangesOptimalOffsets")),
            "has_converged": None
            if _num(opt.get("rlnHasConverged")) is None
            else bool(_num(opt.get("rlnHasConverged"))),
            "n_groups": None,
            "files": {
                k: self.star(it, k) is not None for k in ("optimiser", "sampling", "data", "half1_model", "half2_model")
            },
        }
        # global or local searches
        prior_mode, sigma_rot = (
            _num(general.get("rlnOrientationalPriorMode")),
            _num(general.get("rlnSigmaPriorRotAngle")),
        )
        if _num(sampling.get("rlnIsLocalSearch")) is not None:
            r["local"], r["local_from"] = bool(_num(sampling.get("rlnIsLocalSearch"))), "sampling.star rlnIsLocalSearch"
            r["sigma_ang_deg"] = _num(sampling.get("rlnSigmaPriorRotAngle"))
        elif prior_mode is not None:
            r["local"] = bool(prior_mode > 0 and (sigma_rot or 0) > 0)
            r["local_from"], r["sigma_ang_deg"] = (
                "model.star rlnOrientationalPriorMode/rlnSigmaPriorRotAngle",
                sigma_rot,
            )
        else:
            r["local"], r["local_from"], r["sigma_ang_deg"] = None, None, None
        if parts is not None:
            if "rlnNrOfSignificantSamples" in parts.columns:
                r["mean_significant"] = float(parts["rlnNrOfSignificantSamples"].astype(float).mean())
            if "rlnMaxValueProbDistribution" in parts.columns:
                r["mean_max_prob"] = float(parts["rlnMaxValueProbDistribution"].astype(float).mean())
        if model:
            r["n_groups"] = len([k for k in model if re.fullmatch(r"model_group_\d+", k)])
            r["n_groups_general"] = (
                None if _num(general.get("rlnNrGroups")) is None else int(_num(general.get("rlnNrGroups")))
            )
        halves = [m for m in (model, self.star(it, "half2_model")) if m]
        for key, block, label in (
            ("sigma2", "model_group_1", "rlnSigma2Noise"),
            ("fsc", "model_class_1", "rlnGoldStandardFsc"),
            ("ssnr", "model_class_1", "rlnSsnrMap"),
            ("tau2", "model_class_1", "rlnReferenceTau2"),
        ):
            r[key] = _mean_spectrum([_spectrum(m, block, label) for m in halves])
        # σ_offset: the mean of the halves (RELION keeps one per half); the expected accuracies: half 1's (RELION
        # 3.1.3 estimates them on half 1 only and writes 0 into the half2 model.star)
        vals = [
            v for v in (_num(_general(m, "model_general").get("rlnSigmaOffsetsAngst")) for m in halves) if v is not None
        ]
        r["sigma_offset_angst"] = float(np.mean(vals)) if vals else None
        return r

    def summary(self, last_record: dict | None) -> dict:
        """Iterations to convergence, final resolution (ROOT_model.star), the last iteration's HEALPix order and
        step."""
        final = _general(self.star(None, "model"), "model_general")
        last = self.iterations[-1] if self.iterations else None
        opt = _general(self.star(last, "optimiser"), "optimiser_general") if last is not None else {}
        finished = bool(final)
        rec = last_record or {}
        return {
            "iterations_present": self.iterations,
            "last_iteration": last,
            "final_iteration_without_itNNN_files": self.final_only,
            "finished": finished,
            "converged_flag": None
            if _num(opt.get("rlnHasConverged")) is None
            else bool(_num(opt.get("rlnHasConverged"))),
            "iterations_to_convergence": self.final_iteration if finished else None,
            "final_resolution_angst": _num(final.get("rlnCurrentResolution")) if finished else None,
            "final_healpix_order": rec.get("healpix_order"),
            "final_angular_step_deg": rec.get("angular_step_deg"),
        }


# ---------------------------------------------------------------------------------------------------- alignment
# What a model.star / sampling.star of iteration N holds can differ between the programs. RELION 3.1.3 decides the
# sampling, the window and the expected accuracy at the start of iteration N ("Auto-refine: Iteration= N" in its
# stdout, before "Expectation iteration N") and writes them into iteration N's files: they describe the E-step of N.
# cryorefine has written them at the end of iteration N, for N + 1, into iteration N's files (before its schedule
# followed RELION's order). Each group of keys is therefore read from the files of iteration N - shift, the shift found
# per group from ours' run.log (what each iteration used), 0 where the log does not tell. The rest (resolution, σ², τ²,
# FSC, particles, σ_offset) is what iteration N produced in both programs.
GROUPS = {  # group: (keys read with the group's shift, keys compared with run.log to find it)
    # the expected accuracy goes with the sampling it decided (ours' log prints it with the iteration that computed it)
    "sampling": (
        (
            "healpix_order",
            "angular_step_deg",
            "offset_range_angst",
            "offset_step_angst",
            "local",
            "local_from",
            "sigma_ang_deg",
            "accuracy_rotation_deg",
            "accuracy_translation_angst",
        ),
        ("healpix_order", "local"),
    ),
    "window": (("window_shells",), ("window_shells",)),
}
SCHEDULE_KEYS = tuple(k for keys, _ in GROUPS.values() for k in keys)
LOG_LINE = re.compile(r"iter\s+(\d+)( \(final\))?: resolution [\d.]+ Å, hp(\d+) (global|local), window (\d+)")


def read_log(path: Path) -> dict[int, dict]:
    """cryorefine's run.log: per iteration the HEALPix order, global/local and window it used."""
    out = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for m in LOG_LINE.finditer(text):
        out[int(m.group(1))] = {
            "healpix_order": int(m.group(3)),
            "local": m.group(4) == "local",
            "window_shells": float(m.group(5)),
            "final": bool(m.group(2)),
        }
    return out


def detect_shift(
    written: dict[int, dict], log: dict[int, dict], keys=("window_shells", "healpix_order"), default: int = 0
) -> tuple[int, str]:
    """0 if the files of iteration N hold what the log says iteration N used, 1 if they hold iteration N + 1's."""
    same = nxt = 0
    for it, rec in written.items():
        for key in keys:
            if rec.get(key) is None:
                continue
            same += it in log and log[it].get(key) == rec[key]
            nxt += (it + 1) in log and log[it + 1].get(key) == rec[key]
    if nxt > same:
        return 1, f"iteration N's files hold iteration N+1's (run.log: {nxt} vs {same} matches)"
    if same > nxt:
        return 0, f"iteration N's files hold iteration N's (run.log: {same} vs {nxt} matches)"
    return default, f"{'no run.log' if not log else 'run.log does not tell'}: assumed shift {default}"


def align(written: dict[int, dict], shifts: dict[str, int], log: dict[int, dict]) -> dict[int, dict]:
    """Per iteration N: each group's keys from the files of N - shift, HEALPix order, search and window overridden by
    run.log's (what N used)."""
    used = {}
    for it, rec in written.items():
        r = dict(rec)
        r["as_written"] = {k: rec.get(k) for k in SCHEDULE_KEYS}
        for group, (keys, _) in GROUPS.items():
            shift = shifts.get(group, 0)
            src = written.get(it - shift, {}) if shift else rec
            for k in keys:
                r[k] = src.get(k)
        if it in log:
            for k in ("healpix_order", "local", "window_shells"):
                r[k] = log[it][k]
            if r.get("angular_step_deg") is None:
                r["angular_step_deg"] = 60.0 / 2 ** log[it]["healpix_order"]
            r["from_log"] = ["healpix_order", "local", "window_shells"]
        used[it] = r
    return used


# ---------------------------------------------------------------------------------------------------- comparison
def fsc_shell(fsc: dict[int, float] | None, threshold: float) -> int | None:
    """The last shell (>= 1) before the FSC first drops below ``threshold`` (None if it never reaches it at shell 1)."""
    if not fsc:
        return None
    shells = sorted(s for s in fsc if s >= 1)
    last = None
    for s in shells:
        if fsc[s] < threshold:
            break
        last = s
    return last


def _ratio(a, b, factor=1.0):
    if a is None or b is None or b == 0:
        return None
    return a / factor / b


def ours_power_factor(records: dict, box: int | None) -> float | None:
    """What ours' σ², τ² are divided by to be in RELION's units (see UNITS): 1, or box⁴ for a run written before
    cryorefine's model.star held RELION's units (None if the box is unknown)."""
    if not any(rec.get("local_from") == "sampling.star rlnIsLocalSearch" for rec in records.values()):
        return 1.0
    return None if box is None else float(box**4)


def compare_iteration(it: int, o: dict | None, r: dict | None, win_o, win_r, units: float | None) -> dict:
    """Ratios and the parting test of one iteration (o: ours, r: RELION records, None when the run lacks it; ours'
    σ² and τ² divided by ``units`` to be in RELION's)."""
    out = {"spectra": {}, "differs": [], "checked": []}
    if o is None or r is None:
        return out
    # σ² at fractions of the window both E-steps used
    win = min(w for w in (win_o, win_r) if w) if (win_o or win_r) else None
    sig = []
    for f in WINDOW_FRACTIONS:
        s = max(1, int(round(f * win))) if win else None
        so = o["sigma2"].get(s) if (o.get("sigma2") and s is not None) else None
        sr = r["sigma2"].get(s) if (r.get("sigma2") and s is not None) else None
        sig.append(
            {
                "fraction": f,
                "shell": s,
                "ours": so,
                "relion": sr,
                "ours_relion_units": None if so is None or not units else so / units,
                "ratio": _ratio(so, sr, units) if units else None,
            }
        )
    out["spectra"]["sigma2"] = sig
    # τ², SSNR, FSC where RELION's FSC crosses 0.8, 0.5, 0.143
    at = []
    for t in FSC_THRESHOLDS:
        s = fsc_shell(r.get("fsc"), t)
        e = {"threshold": t, "shell": s}
        for key in ("fsc", "ssnr", "tau2"):
            e[f"{key}_ours"] = o[key].get(s) if (o.get(key) and s is not None) else None
            e[f"{key}_relion"] = r[key].get(s) if (r.get(key) and s is not None) else None
        e["tau2_ratio"] = _ratio(e["tau2_ours"], e["tau2_relion"], units) if units else None
        at.append(e)
    out["spectra"]["at_fsc"] = at

    # the parting rule
    def check(name, a, b, differ):
        if a is None or b is None:
            return
        out["checked"].append(name)
        if differ(a, b):
            out["differs"].append(f"{name}: ours {_fmt(a)} vs RELION {_fmt(b)}")

    check("HEALPix order", o["healpix_order"], r["healpix_order"], lambda a, b: a != b)
    check("local searches", o["local"], r["local"], lambda a, b: a != b)
    check(
        "offset step (Å)",
        o["offset_step_angst"],
        r["offset_step_angst"],
        lambda a, b: abs(a - b) > 1e-3 * max(1.0, abs(b)),
    )
    check("resolution shell", o["resolution_shell"], r["resolution_shell"], lambda a, b: abs(a - b) > 1.0 + 1e-6)
    check("window (shells)", o["window_shells"], r["window_shells"], lambda a, b: abs(a - b) > 2.0 + 1e-6)
    return out


def build(ours_dir, relion_dir, root: str = "run", input_star=None) -> dict:
    runs = {"ours": Run(Path(ours_dir), root, "ours"), "relion": Run(Path(relion_dir), root, "relion")}
    notes = []
    for name, run in runs.items():
        if not run.iterations:
            notes.append(f"{name}: no {root}_itNNN_*.star files in {run.dir}")
    written = {name: {it: run.record(it) for it in run.iterations} for name, run in runs.items()}
    records, alignment = {}, {}
    for name, run in runs.items():
        log = read_log(run.dir / f"{root}.log") if name == "ours" else {}
        shifts, how = {}, {}
        for group, (_, match) in GROUPS.items():
            if name == "relion":  # RELION 3.1.3 writes iteration N's own sampling, window and accuracy into N's files
                shifts[group], how[group] = 0, "RELION 3.1.3: iteration N's files hold iteration N's"
            else:
                shifts[group], how[group] = detect_shift(written[name], log, match)
        records[name] = align(written[name], shifts, log)
        alignment[name] = {"shift": shifts, "how": how, "log_iterations": sorted(log)}
        if name == "ours":
            notes.append(
                "ours: "
                + "; ".join(f"{g} of iteration N from the files of N-{shifts[g]} ({how[g]})" for g in GROUPS)
                + ("; HEALPix order, search and window from run.log" if log else "")
            )
    # pose changes from consecutive data.star files (iteration 1 against it000, else the --input poses, else the other
    # program's it000 data.star: the same input particles)
    start = particles_block(read_star(Path(input_star))) if input_star else None
    for name, run in runs.items():
        other = runs["relion" if name == "ours" else "ours"]
        for it in run.iterations:
            prev = run.particles(it - 1) if (it - 1) in run.iterations else None
            source = f"{root}_it{it - 1:03d}_data.star"
            if prev is None and it == 1:
                if start is not None:
                    prev, source = start, f"--input {input_star}"
                elif other.particles(0) is not None:
                    prev, source = other.particles(0), f"the other program's {root}_it000_data.star (the input poses)"
            ch = pose_changes(prev, run.particles(it)) if it >= 1 else None
            records[name][it]["change_orientation_deg"] = None if ch is None else ch["angle_deg"]
            records[name][it]["change_offset_angst"] = None if ch is None else ch.get("offset_angst")
            records[name][it]["change_against"] = None if ch is None else source
    # box: from either model.star
    box = next((rec["box"] for name in PROGRAMS for rec in records[name].values() if rec.get("box")), None)
    boxes = {rec["box"] for name in PROGRAMS for rec in records[name].values() if rec.get("box")}
    if len(boxes) > 1:
        notes.append(f"different boxes in the two runs: {sorted(boxes)}; σ²/τ² ratios use box {box}")
    for name in PROGRAMS:
        groups = {
            (rec.get("n_groups"), rec.get("n_groups_general"))
            for rec in records[name].values()
            if rec.get("n_groups") is not None
        }
        if groups:
            g = sorted(groups, key=str)
            notes.append(
                f"{name}: data_model_group_N blocks / rlnNrGroups per model.star: {', '.join(f'{a}/{b}' for a, b in g)}"
                + (" (σ² compared on group 1)" if any((a or 0) > 1 for a, _ in g) else " (one noise group)")
            )
    all_its = sorted(set(records["ours"]) | set(records["relion"]))
    rows, parted, units = [], None, ours_power_factor(records["ours"], box)
    for it in all_its:
        o, r = records["ours"].get(it), records["relion"].get(it)
        cmp = compare_iteration(it, o, r, (o or {}).get("window_shells"), (r or {}).get("window_shells"), units)
        row = {"iteration": it, "ours": _public(o), "relion": _public(r), **cmp}
        if parted is None and cmp["differs"] and it >= 1:  # iteration 0 is the start (RELION's it000): no E-step ran
            parted = {"iteration": it, "what": cmp["differs"]}
        rows.append(row)
    common = sorted(it for it in set(records["ours"]) & set(records["relion"]) if it >= 1)
    return {
        "ours_dir": str(ours_dir),
        "relion_dir": str(relion_dir),
        "root": root,
        "box": box,
        "sigma2_tau2_unit_factor": units,
        "iterations": rows,
        "common_iterations": common,
        "alignment": alignment,
        "parted": parted,
        "parting_rule": "first common iteration where the HEALPix order, global/local or the offset step differ, "
        "the resolution differs by more than one Fourier shell, or the E-step window by more than 2 shells",
        "summary": {
            name: runs[name].summary(records[name].get(runs[name].iterations[-1]) if runs[name].iterations else None)
            for name in PROGRAMS
        },
        "notes": notes,
    }


def _public(rec: dict | None) -> dict | None:
    """A record without the whole spectra (kept short for the JSON: the compared shells are in 'spectra')."""
    if rec is None:
        return None
    return {k: v for k, v in rec.items() if k not in ("sigma2", "fsc", "ssnr", "tau2")}


# ---------------------------------------------------------------------------------------------------- output
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"


def _pair(o: dict | None, r: dict | None, key: str, fmt=_fmt) -> str:
    a = fmt(o.get(key)) if o else "·"
    b = fmt(r.get(key)) if r else "·"
    return f"{a} / {b}"


def _search(rec: dict | None) -> str:
    if rec is None:
        return "·"
    if rec.get("local") is None:
        return "–"
    return f"local σ{_fmt(rec.get('sigma_ang_deg'))}°" if rec["local"] else "global"


def _offsets(rec: dict | None) -> str:
    if rec is None:
        return "·"
    return f"{_fmt(rec.get('offset_range_angst'))}/{_fmt(rec.get('offset_step_angst'))}"


def markdown(res: dict) -> str:
    L = [f"# Auto-refine trajectories: cryorefine ({res['ours_dir']}) vs RELION 3.1.3 ({res['relion_dir']})", ""]
    p = res["parted"]
    if p:
        L.append(f"**The runs part at iteration {p['iteration']}**: " + "; ".join(p["what"]) + ".")
    elif res["common_iterations"]:
        L.append(
            f"**The runs do not part** over their {len(res['common_iterations'])} common iterations "
            f"({res['common_iterations'][0]}–{res['common_iterations'][-1]})."
        )
    else:
        L.append("**No common iterations** to compare.")
    L += [
        "",
        f"Parting rule: {res['parting_rule']}. Cells are ours / RELION; · = iteration absent, "
        "– = file or label missing.",
        "",
    ]
    L += ["## Summary", "", "| | cryorefine | RELION 3.1.3 |", "|---|---|---|"]
    so, sr = res["summary"]["ours"], res["summary"]["relion"]

    def conv(s):
        if s["finished"]:
            return str(s["iterations_to_convergence"])
        return (
            f"not finished ({s['last_iteration']} iterations so far)"
            if s["last_iteration"] is not None
            else "no iterations"
        )

    L.append(f"| iterations to convergence | {conv(so)} | {conv(sr)} |")
    L.append(
        f"| final resolution (run_model.star, Å) | {_fmt(so['final_resolution_angst'])} | "
        f"{_fmt(sr['final_resolution_angst'])} |"
    )
    L.append(
        f"| final HEALPix order / angular step (°) | {_fmt(so['final_healpix_order'])} / "
        f"{_fmt(so['final_angular_step_deg'])} | "
        f"{_fmt(sr['final_healpix_order'])} / {_fmt(sr['final_angular_step_deg'])} |"
    )
    L.append("")
    finals = {name: res["summary"][name]["iterations_to_convergence"] for name in PROGRAMS}

    def mark(it):
        who = [label for name, label in (("ours", "ours"), ("relion", "RELION")) if finals[name] == it]
        return (" (final: " + ", ".join(who) + ")" if who else "") + (" ◀" if p and it == p["iteration"] else "")

    L += [
        "## Sampling and resolution",
        "",
        "| it | HEALPix order | step (°) | offsets range/step (Å) | search | resolution (Å) | res. shell "
        "| window (shells) | differs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["iterations"]:
        o, r, it = row["ours"], row["relion"], row["iteration"]
        L.append(
            f"| {it}{mark(it)} | {_pair(o, r, 'healpix_order')} | {_pair(o, r, 'angular_step_deg')} | "
            f"{_offsets(o)} / {_offsets(r)} | "
            f"{_search(o)} / {_search(r)} | {_pair(o, r, 'resolution_angst')} | {_pair(o, r, 'resolution_shell')} | "
            f"{_pair(o, r, 'window_shells')} | {'; '.join(row['differs']) or ''} |"
        )
    L += [
        "",
        "## Particles, changes, accuracy",
        "",
        "Changes by RELION 3.1.3's definitions from consecutive data.star files (angle: mean Euler-axes distance; "
        'offset: sqrt(Σ(Δx²+Δy²)/2N)); "RELION\'s own" is its optimiser.star rlnChangesOptimalOrientations / '
        "rlnChangesOptimalOffsets.",
        "",
        "| it | ⟨nr significant⟩ | ⟨max prob⟩ | Δangle (°) | Δoffset (Å) | RELION's own Δangle / Δoffset "
        "| acc. rot (°) | acc. trans (Å) | σ_offset (Å) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["iterations"]:
        o, r, it = row["ours"], row["relion"], row["iteration"]
        own = f"{_fmt(r.get('own_change_orientation_deg'))} / {_fmt(r.get('own_change_offset_angst'))}" if r else "·"
        L.append(
            f"| {it}{mark(it)} | {_pair(o, r, 'mean_significant')} | {_pair(o, r, 'mean_max_prob')} | "
            f"{_pair(o, r, 'change_orientation_deg')} | "
            f"{_pair(o, r, 'change_offset_angst')} | {own} | {_pair(o, r, 'accuracy_rotation_deg')} | "
            f"{_pair(o, r, 'accuracy_translation_angst')} | {_pair(o, r, 'sigma_offset_angst')} |"
        )
    L += [
        "",
        "## Spectra",
        "",
        f"σ² ratio = (ours / f) / RELION of rlnSigma2Noise (box {res['box']}, "
        f"f = {_fmt(res['sigma2_tau2_unit_factor'])}: ours in RELION's units, see UNITS) at 1/4, 1/2, 3/4 "
        "of the smaller E-step window [shell]. At the shells where RELION's half-set FSC last stays "
        "≥ 0.8 / 0.5 / 0.143 [shell]: τ² ratio (ours / f) / RELION, rlnSsnrMap and rlnGoldStandardFsc "
        "as ours / RELION.",
        "",
        "| it | σ² ratio ¼ | σ² ratio ½ | σ² ratio ¾ | τ² ratio @0.8 / 0.5 / 0.143 | SSNR @0.8 | SSNR @0.5 "
        "| SSNR @0.143 | FSC @0.8 | FSC @0.5 | FSC @0.143 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["iterations"]:
        it, sp = row["iteration"], row["spectra"]
        if not sp:
            L.append(f"| {it}{mark(it)} |" + " · |" * 10)
            continue
        sig = [f"{_fmt(s['ratio'])} [{_fmt(s['shell'])}]" for s in sp["sigma2"]]
        at = sp["at_fsc"]
        tau = " / ".join(_fmt(e["tau2_ratio"]) for e in at) + " [" + ",".join(_fmt(e["shell"]) for e in at) + "]"
        ssnr = [f"{_fmt(e['ssnr_ours'])} / {_fmt(e['ssnr_relion'])}" for e in at]
        fsc = [f"{_fmt(e['fsc_ours'])} / {_fmt(e['fsc_relion'])}" for e in at]
        L.append(f"| {it}{mark(it)} | {' | '.join(sig)} | {tau} | {' | '.join(ssnr)} | {' | '.join(fsc)} |")
    if res["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ours_dir", help="cryorefine output folder (ROOT_itNNN_*.star)")
    ap.add_argument("relion_dir", help="RELION 3.1.3 output folder (same names)")
    ap.add_argument("--o", dest="out_md", default=None, help="write the Markdown here too")
    ap.add_argument("--json", dest="out_json", default=None, help="write the data as JSON")
    ap.add_argument("--root", default="run", help="output root name in both folders (default: run)")
    ap.add_argument(
        "--input",
        default=None,
        help="input particles.star: the poses before iteration 1, for runs without ROOT_it000_data.star",
    )
    a = ap.parse_args(argv)
    for d in (a.ours_dir, a.relion_dir):
        if not Path(d).is_dir():
            print(f"trajectory.py: not a folder: {d}", file=sys.stderr)
            return 2
    res = build(a.ours_dir, a.relion_dir, a.root, a.input)
    md = markdown(res)
    sys.stdout.write(md)
    if a.out_md:
        Path(a.out_md).write_text(md)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(_jsonable(res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
