"""report.html's page around its figures: which figures a report has, the page's sections, metadata and iteration
table, written atomically. Kept apart from the figures (report.py, matplotlib) so that the run's process can put
together a page whose figures several worker processes drew, without importing matplotlib itself."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path

import numpy as np

from .io.atomic import atomic_write

FIGURE_TITLES = {
    "fsc": "Half-map FSC against resolution",
    "resolution": "Resolution per iteration",
    "changes": "Pose changes per iteration",
    "angdist": "Angular distribution (rot vs tilt)",
    "classes": "Class distribution per iteration",
    "stages": "Time per stage per iteration",
    "slices": "Central slices of the map",
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1200px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 6px 0;word-break:break-all}
h2{font-size:17px;margin:26px 0 8px 0;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#444;font-size:14px;line-height:1.6} .meta b{color:#000}
.grid{display:flex;flex-wrap:wrap;gap:16px} .grid figure{margin:0}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#666;margin-top:3px}
.err{color:#a33;font-size:13px;padding:8px;border:1px dashed #c88}
table{border-collapse:collapse;font-size:13px;margin-top:4px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f3f3f3} th.note{text-align:left}
td.note{text-align:left;max-width:420px} tr.final td{font-weight:bold}
"""


def number(x, default=float("nan")) -> float:
    """``x`` as a float, ``default`` where it is none (a record's missing or odd field)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def figure_jobs(history: list[dict], fsc, box: int, angpix: float, poses, slices) -> list[tuple[str, tuple]]:
    """(key of FIGURE_TITLES, the arguments report.draw_figure draws it from) of each figure this report has, the
    costliest first (workers drawing them in parallel take them in this order). ``poses``: rot_deg and tilt_deg per
    particle; ``slices``: the map's central (xy, xz, yz) planes (refine.steps.central_slices)."""
    jobs: list[tuple[str, tuple]] = [("slices", (slices, angpix)), ("angdist", (poses,))]
    if history:
        jobs += [("stages", (history,)), ("changes", (history,))]
    jobs.append(("fsc", (fsc, box, angpix)))
    if any(h.get("class_distribution") is not None for h in history):
        jobs.append(("classes", (history,)))
    if history:
        jobs.append(("resolution", (history,)))
    return jobs


def write_page(
    out_dir, root: str, history: list[dict], box: int, angpix: float, n_particles: int, figures: dict[str, str]
) -> None:
    """``out_dir``/report.html (atomically) of the run ``root`` with ``figures`` (key of FIGURE_TITLES -> the
    <figure> HTML report.draw_figure made; a missing key leaves its place empty)."""
    history = list(history or [])
    last = history[-1] if history else {}
    res = number(last.get("resolution_angst"))
    status = "finished" if last.get("final") else "running"
    title = f"cryorefine report — {root}"
    fig = figures.get
    has_classes = any(h.get("class_distribution") is not None for h in history)
    sections = [
        "<h2>Resolution</h2>" + _grid(fig("fsc", ""), fig("resolution", "")),
        "<h2>Pose changes and angular distribution</h2>" + _grid(fig("changes", ""), fig("angdist", "")),
    ]
    if history:
        sections.append(
            f"<h2>{'Class distribution and time' if has_classes else 'Time'} per iteration</h2>"
            + _grid(fig("classes", ""), fig("stages", ""))
        )
    sections.append("<h2>Map</h2>" + _grid(fig("slices", "")))
    sections.append("<h2>Iterations</h2>" + _table(history))

    total_s = sum(number(h.get("seconds"), 0.0) for h in history)
    meta = (
        f"<div class=meta>Generated <b>{time.strftime('%Y-%m-%d %H:%M:%S')}</b> · status <b>{status}</b> · "
        f"<b>{len(history)}</b> iteration{'s' if len(history) != 1 else ''} · latest resolution "
        f"<b>{_fmt(res, '.2f')} Å</b> · {n_particles} particles · box {int(box)} px at {angpix:.4g} Å/px · "
        f"total time {total_s:.1f} s</div>"
    )
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{meta}\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = Path(out_dir) / "report.html"
    with atomic_write(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def n_particles(poses) -> int:
    """How many particles ``poses`` (rot_deg per particle) has."""
    return len(np.asarray(poses.rot_deg).ravel())


def _grid(*figures: str) -> str:
    return "<div class=grid>" + "".join(figures) + "</div>"


def _fmt(x, spec: str, empty: str = "–") -> str:
    v = number(x)
    return empty if not math.isfinite(v) else format(v, spec)


def _table(history) -> str:
    head = ("iteration", "resolution (Å)", "sampling", "Δangle (°)", "Δoffset (px)", "nsig", "pmax", "time (s)", "note")
    out = [
        "<table><thead><tr>"
        + "".join(f"<th class=note>{h}</th>" if h == "note" else f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for h in history:
        order = h.get("healpix_order")
        samp = "–"
        if order is not None:
            samp = f"hp{int(order)} ({60.0 / 2 ** int(order):.2f}°), {'local' if h.get('local') else 'global'}"
        note = h.get("note") or ""
        if h.get("final"):
            note = "final iteration" + ("; " + note if note else "")
        cells = [
            f"{int(number(h.get('iteration'), 0))}",
            _fmt(h.get("resolution_angst"), ".2f"),
            html.escape(samp),
            _fmt(h.get("change_orientation_deg"), ".2f"),
            _fmt(h.get("change_offset_px"), ".2f"),
            _fmt(h.get("mean_significant"), ".1f"),
            _fmt(h.get("mean_max_prob"), ".3f"),
            _fmt(h.get("seconds"), ".1f"),
        ]
        row = "".join(f"<td>{c}</td>" for c in cells) + f'<td class="note">{html.escape(str(note))}</td>'
        out.append(f"<tr{' class=final' if h.get('final') else ''}>{row}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)
