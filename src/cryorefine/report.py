"""report.html's figures: a self-contained summary of a refinement, regenerated after every iteration (the page
around them: report_page.py).

Every plot is a matplotlib figure rendered with the Agg backend into a PNG that is embedded as a
base64 `data:` URI, so the page needs no other file, no network and no JavaScript.  Figures are
made with `matplotlib.figure.Figure` (not pyplot), so no global figure state is created or leaked
and the caller's interactive backend, if any, is left alone.

A plot that fails to draw (odd input) is replaced by a short message; the rest of the page is
still written, so a report problem never stops a refinement.
"""

from __future__ import annotations

import base64
import html
import io
import sys

import numpy as np

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # don't switch the backend of a session that already uses pyplot
    matplotlib.use("Agg")  # (the figures below use the Agg canvas directly either way)

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cryorefine.report_page import FIGURE_TITLES, figure_jobs, n_particles, number, write_page  # noqa: E402

_DPI = 90
_STAGE_COLOURS = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]


# ---------------------------------------------------------------------------------------- helpers
def _fig(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    # zlib level 3: the central slices of a 256³ map encode in 2/3 of the default level's time, at about its size
    fig.savefig(buf, format="png", dpi=_DPI, pil_kwargs={"compress_level": 3})
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(title: str, draw, *args) -> str:
    """An <figure> with the PNG made by `draw(*args) -> Figure`, or an error note if drawing fails."""
    try:
        fig = draw(*args)
        if fig is None:
            return ""
        data = _png(fig)
    except Exception as exc:  # a broken plot must never break the refinement
        why = f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}"
        return f'<div class="err">{html.escape(title)}: could not draw ({why})</div>'
    return (
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _iters(history):
    return np.array([number(h.get("iteration"), i) for i, h in enumerate(history)])


# ------------------------------------------------------------------------------------------ plots
def _plot_fsc(fsc: np.ndarray, box: int, angpix: float):
    fsc = np.asarray(fsc, dtype=float).ravel()
    fig = _fig(6.4, 3.6)
    ax = fig.add_subplot()
    s = np.arange(len(fsc))
    freq = s / (box * angpix)  # 1/Å
    sel = s >= 1
    if np.any(fsc[sel] != 0):
        ax.plot(freq[sel], fsc[sel], color="#1f4e9c", lw=1.6, label="half-map FSC")
        for thr, col in ((0.143, "#c44e52"), (0.5, "#55a868")):
            ax.axhline(thr, color=col, ls="--", lw=1, label=f"FSC = {thr:g}")
            below = np.flatnonzero(sel & (fsc < thr))
            if below.size and below[0] > 1:
                i = below[0]  # interpolate the crossing between shells i-1 and i
                f0, f1 = fsc[i - 1], fsc[i]
                x = freq[i - 1] + (f0 - thr) / (f0 - f1) * (freq[i] - freq[i - 1]) if f0 != f1 else freq[i]
                ax.axvline(x, color=col, ls=":", lw=0.8)
                ax.annotate(
                    f"{1 / x:.2f} Å", (x, thr), textcoords="offset points", xytext=(4, 4), fontsize=8, color=col
                )
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(
            0.5,
            0.5,
            "no half-map FSC (e.g. classification)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#666",
        )
    ax.set_xlim(0, freq[-1] if len(freq) > 1 else 1)
    ax.set_ylim(-0.1, 1.05)
    ax.set_ylabel("FSC")
    ax.set_xlabel("resolution (Å)   [axis linear in 1/Å]")
    ticks = ax.get_xticks()
    ticks = ticks[(ticks > 0) & (ticks <= ax.get_xlim()[1] + 1e-12)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{1 / t:.3g}" for t in ticks])
    ax.grid(alpha=0.3)
    ax.set_title(f"Fourier shell correlation (Nyquist {2 * angpix:.2f} Å)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_resolution(history):
    it = _iters(history)
    res = np.array([number(h.get("resolution_angst")) for h in history])
    fig = _fig(6.4, 3.6)
    ax = fig.add_subplot()
    ax.plot(it, res, "o-", color="#1f4e9c", ms=4)
    for x, y, h in zip(it, res, history):
        if h.get("local"):
            ax.plot(x, y, "s", mfc="none", mec="#c44e52", ms=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("resolution (Å)")
    ax.set_title("resolution per iteration (□ = local search)", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_changes(history):
    it = _iters(history)
    ang = np.array([number(h.get("change_orientation_deg")) for h in history])
    off = np.array([number(h.get("change_offset_px")) for h in history])
    fig = _fig(6.4, 3.6)
    ax = fig.add_subplot()
    l1 = ax.plot(it, ang, "o-", color="#1f4e9c", ms=4, label="orientation (°)")
    ax.set_ylabel("mean orientation change (°)", color="#1f4e9c")
    ax2 = ax.twinx()
    l2 = ax2.plot(it, off, "s--", color="#dd8452", ms=4, label="offset (px, rms)")
    ax2.set_ylabel("rms offset change (px)", color="#dd8452")
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax.set_xlabel("iteration")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(l1 + l2, [ln.get_label() for ln in l1 + l2], fontsize=8, loc="upper right")
    ax.set_title("pose changes per iteration", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_angdist(poses):
    rot = np.asarray(poses.rot_deg, dtype=float).ravel()
    tilt = np.asarray(poses.tilt_deg, dtype=float).ravel()
    ok = np.isfinite(rot) & np.isfinite(tilt)
    rot = (rot[ok] + 180.0) % 360.0 - 180.0
    tilt = np.clip(tilt[ok], 0.0, 180.0)
    fig = _fig(6.4, 3.6)
    ax = fig.add_subplot()
    h, xe, ye = np.histogram2d(rot, tilt, bins=(72, 36), range=((-180, 180), (0, 180)))
    im = ax.imshow(
        h.T,
        origin="lower",
        extent=(-180, 180, 0, 180),
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        norm=PowerNorm(0.5, vmin=0, vmax=max(1.0, float(h.max()))),
    )
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("particles per 5°×5° bin (sqrt scale)", fontsize=8)
    ax.set_xlabel("rot (°)")
    ax.set_ylabel("tilt (°)")
    ax.set_xticks(np.arange(-180, 181, 60))
    ax.set_yticks(np.arange(0, 181, 30))
    empty = 0.0
    if h.size:
        w = np.sin(np.deg2rad(0.5 * (ye[:-1] + ye[1:])))[None, :]  # bins near the poles cover little sphere
        empty = float(np.sum(w * (h == 0)) / np.sum(w * np.ones_like(h)))
    ax.set_title(f"angular distribution ({ok.sum()} particles; {100 * empty:.0f}% of sphere area empty)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_classes(history):
    rows = [
        (i, h["class_distribution"])
        for i, h in zip(_iters(history), history)
        if h.get("class_distribution") is not None
    ]
    if not rows:
        return None
    k = max(len(c) for _, c in rows)
    it = np.array([r[0] for r in rows])
    frac = np.full((len(rows), k), np.nan)
    for j, (_, c) in enumerate(rows):
        frac[j, : len(c)] = np.asarray(c, dtype=float)
    fig = _fig(6.4, 3.6)
    ax = fig.add_subplot()
    for c in range(k):
        ax.plot(
            it, frac[:, c], "o-", ms=3, lw=1.3, label=f"class {c + 1}", color=_STAGE_COLOURS[c % len(_STAGE_COLOURS)]
        )
    ax.set_ylim(0, max(1.0, float(np.nanmax(frac)) * 1.05) if np.isfinite(frac).any() else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of particles")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, ncol=2 if k > 4 else 1, loc="best")
    ax.set_title("class distribution per iteration", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_stages(history):
    it = _iters(history)
    names: list[str] = []
    for h in history:
        for k in h.get("stages") or {}:
            if k not in names:
                names.append(k)
    fig = _fig(6.4, 3.6)
    ax = fig.add_subplot()
    bottom = np.zeros(len(history))
    for j, name in enumerate(names):
        v = np.array([number((h.get("stages") or {}).get(name), 0.0) for h in history])
        v = np.nan_to_num(v)
        ax.bar(it, v, bottom=bottom, width=0.75, label=name, color=_STAGE_COLOURS[j % len(_STAGE_COLOURS)])
        bottom += v
    total = np.array([number(h.get("seconds"), 0.0) for h in history])
    other = np.clip(np.nan_to_num(total) - bottom, 0, None)
    if np.any(other > 0.01 * max(1e-9, float(np.max(total)))):
        ax.bar(it, other, bottom=bottom, width=0.75, label="other", color="#dddddd", edgecolor="#bbbbbb", lw=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if names:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("time per stage per iteration", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _plot_slices(slices, angpix: float):
    """``slices``: the map's central (xy, xz, yz) planes (refine.steps.central_slices)."""
    xy, xz, yz = (np.asarray(p, dtype=np.float32) for p in slices)
    if xy.ndim != 2 or xz.ndim != 2 or yz.ndim != 2:
        raise ValueError(f"expected three 2D slices, got shapes {xy.shape}, {xz.shape}, {yz.shape}")
    d0, (d1, d2) = xz.shape[0], xy.shape
    slices = [
        ("xy (z = centre)", xy, "x", "y"),
        ("xz (y = centre)", xz, "x", "z"),
        ("yz (x = centre)", yz, "y", "z"),
    ]
    shown = np.concatenate([img.ravel() for _, img, _, _ in slices])
    finite = shown[np.isfinite(shown)]
    lo, hi = np.percentile(finite, [0.5, 99.9]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    fig = _fig(12.8, 4.6)  # fixed margins: constrained/tight layout would cost ~0.2 s here
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.11, top=0.86, wspace=0.15)
    for j, (title, img, xl, yl) in enumerate(slices):
        ax = fig.add_subplot(1, 3, j + 1)
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{xl} (px)", fontsize=8)
        ax.set_ylabel(f"{yl} (px)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"central slices of the map ({d2}×{d1}×{d0} px, {angpix:.3g} Å/px; "
        "grey scale 0.5–99.9th percentile of the slices)",
        fontsize=10,
    )
    return fig


# ------------------------------------------------------------------------------------------- page
_DRAW = {
    "fsc": _plot_fsc,
    "resolution": _plot_resolution,
    "changes": _plot_changes,
    "angdist": _plot_angdist,
    "classes": _plot_classes,
    "stages": _plot_stages,
    "slices": _plot_slices,
}


def draw_figure(key: str, *args) -> str:
    """The <figure> HTML of report_page.FIGURE_TITLES' ``key`` drawn from ``args`` (report_page.figure_jobs)."""
    return _img(FIGURE_TITLES[key], _DRAW[key], *args)


def write_report(
    out_dir, root: str, history: list[dict], fsc: np.ndarray, box: int, angpix: float, poses, slices
) -> None:
    """Write `out_dir/report.html` (atomically): plots of the run so far, embedded as base64 PNGs, drawn here one
    after the other. ``slices``: the map's central (xy, xz, yz) planes (refine.steps.central_slices)."""
    history = list(history or [])
    jobs = figure_jobs(history, fsc, box, angpix, poses, slices)
    figures = {key: draw_figure(key, *args) for key, args in jobs}
    write_page(out_dir, root, history, box, angpix, n_particles(poses), figures)
