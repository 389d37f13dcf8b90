"""What every plot of ``analysis`` shares: style, figures, sizes in order, colours, legends, axes.

``analysis.plots`` (the paper's plots), ``analysis.plots_laws`` (fitted laws, residuals,
backtests) and ``analysis.gallery`` (sample grids) draw through these, so a size has one colour
and one place in every legend of a report.

Sizes are ordered by size, never by name: the paper's S < B < L < XL, and a study's own sizes
(``xs``, ``s``, ``m``, ``d4-h64``) by their parameter count. Colour follows that order on a
sequential colormap, bigger = darker, so the order reads at a glance without the legend.
Figures are built without pyplot, so plotting leaves no global state behind.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from analysis.schema import size_order
from analysis.units import flops_formatter, params_formatter

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "lines.linewidth": 1.6,
    "lines.markersize": 5, "savefig.bbox": "tight", "savefig.pad_inches": 0.05, "svg.fonttype": "path",
    "legend.frameon": False,
}
PATCH_MARKERS = {2: "o", 4: "s", 8: "^", 1: "D", 16: "v"}
PATCH_LINES = {2: "-", 4: "--", 8: ":", 1: "-.", 16: (0, (5, 1, 1, 1))}
# Patch colours where colour encodes the patch (residual panels), not the size.
PATCH_COLORS = {1: "#7F7F7F", 2: "#D62728", 4: "#1F77B4", 8: "#2CA02C", 16: "#9467BD"}
SIZE_CMAP = "viridis"
# The slice of the colormap sizes use, smallest size first: its lightest end (yellow) is too
# pale on white, so the smallest size starts at lime and the largest ends at deep purple.
SIZE_CMAP_RANGE = (0.82, 0.05)
REFERENCE_COLOR = "#888888"
DPI = 200


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------


def figure(width: float = 5.0, height: float = 3.6, ncols: int = 1, nrows: int = 1, **kw: Any) -> tuple[Any, Any]:
    """A constrained-layout Figure with an Agg canvas and a 2-D array of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save(fig: Any, stem: str | Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` (the SVG without a date, so reruns compare)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        path = stem.with_name(stem.name + f".{ext}")
        fig.savefig(path, dpi=DPI, format=ext, metadata={"Date": None} if ext == "svg" else None)
        out.append(path)
    return out


def with_style(fn: Callable) -> Callable:
    """Run ``fn`` under :data:`STYLE` (rc settings are restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def has(df: pd.DataFrame | None, col: str) -> bool:
    """True when ``df`` has a column ``col`` with at least one number in it."""
    return df is not None and col in df and bool(pd.to_numeric(df[col], errors="coerce").notna().any())


# ------------------------------------------------------------------------------------------
# Sizes, patches and their styles
# ------------------------------------------------------------------------------------------


def _size_keys(rows: pd.DataFrame, present: list[str]) -> dict[str, float] | None:
    """Each size's position on a numeric scale: median params, else median Gflops × patch²
    (a transformer's flops scale with its token count, 1/patch², so the product compares
    sizes as if at equal patch); None when some size has neither."""
    for column, scale in (("params", None), ("gflops", "patch_size")):
        if column not in rows:
            continue
        value = pd.to_numeric(rows[column], errors="coerce").astype(float)
        if scale is not None and scale in rows:
            value = value * pd.to_numeric(rows[scale], errors="coerce").astype(float).fillna(1.0) ** 2
        keys = value.groupby(rows["size"].astype(str)).median()  # float: a missing value is nan, not NA
        if all(s in keys.index and np.isfinite(keys[s]) and keys[s] > 0 for s in present):
            return {s: float(keys[s]) for s in present}
    return None


# Size words as people name custom sizes, smallest first (the paper's S, B, L, XL among them):
# the order of last resort, for frames that carry neither params nor Gflops.
_SIZE_WORDS = ("xxxs", "xxs", "tiny", "xs", "s", "small", "m", "medium", "b", "base", "l", "large", "xl",
               "xxl", "h", "huge", "g", "giant")
_DEPTH_WIDTH = re.compile(r"^d(\d+)-h(\d+)$")  # analysis.runs.model_size's name for a custom config


def _name_key(size: str) -> float:
    """A size's place from its name alone: a size word's rank, else depth × width² of a
    'd{depth}-h{hidden}' name (the parameter count up to a constant), else unknown (inf)."""
    low = size.lower()
    if low in _SIZE_WORDS:
        return float(_SIZE_WORDS.index(low))
    m = _DEPTH_WIDTH.match(low)
    return len(_SIZE_WORDS) + float(m[1]) * float(m[2]) ** 2 if m else math.inf


def ordered_sizes(*frames: pd.DataFrame | None) -> list[str]:
    """The sizes in ``frames``, smallest first: by parameter count (else Gflops at equal patch,
    else what the name says: xs < s < m, d4-h64 < d6-h96), ties by the paper's S, B, L, XL,
    then by name."""
    parts = [f for f in frames if f is not None and "size" in f and len(f)]
    if not parts:
        return []
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    rows = rows[rows["size"].notna()]
    present = list(dict.fromkeys(str(s) for s in rows["size"]))
    paper = size_order()
    rank = {s: (paper.index(s) if s in paper else len(paper)) for s in present}
    keys = _size_keys(rows, present)
    if keys is None:
        return sorted(present, key=lambda s: (_name_key(s), rank[s], s))
    return sorted(present, key=lambda s: (keys[s], rank[s], s))


def size_color(size: str, sizes: list[str]) -> str:
    """``size``'s colour among ``sizes`` (smallest first): lighter small, darker large."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if size not in sizes:
        return "#333333"
    lo, hi = SIZE_CMAP_RANGE
    t = sizes.index(size) / (len(sizes) - 1) if len(sizes) > 1 else 0.6
    return to_hex(colormaps[SIZE_CMAP](lo + (hi - lo) * t))


def size_label(size: Any) -> str:
    return f"DiT-{size}"


def patches(df: pd.DataFrame) -> list[int]:
    """The patch sizes in ``df``, ascending."""
    if "patch_size" not in df:
        return []
    return sorted({int(p) for p in pd.to_numeric(df["patch_size"], errors="coerce").dropna()})


def patch_of(row: Any) -> int | None:
    patch = row.get("patch_size") if hasattr(row, "get") else None
    return int(patch) if patch is not None and not pd.isna(patch) else None


def style_of(row: Any, sizes: list[str]) -> dict[str, Any]:
    """Colour by size, marker and line style by patch, for one row of a frame."""
    patch = patch_of(row)
    return {"color": size_color(str(row.get("size")), sizes),
            "marker": PATCH_MARKERS.get(patch, "o"), "linestyle": PATCH_LINES.get(patch, "-")}


def model_order(df: pd.DataFrame, sizes: list[str] | None = None) -> list[str]:
    """Trials ordered by size (smallest first), then by Gflops: the order legends list them in."""
    sizes = ordered_sizes(df) if sizes is None else sizes
    first = df.groupby("trial", sort=False).first()
    rank = (first["size"].map(lambda s: sizes.index(str(s)) if str(s) in sizes else len(sizes))
            if "size" in first else 0)
    gflops = pd.to_numeric(first["gflops"], errors="coerce") if "gflops" in first else 0.0
    first = first.assign(_rank=rank, _gflops=gflops).sort_values(["_rank", "_gflops"], kind="mergesort")
    return list(first.index)


def size_patch_handles(sizes: list[str], patch_sizes: list[int]) -> list[Any]:
    """Legend entries: one colour per size (in size order), one marker/line per patch."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=size_color(s, sizes), lw=2.5, label=size_label(s)) for s in sizes]
    handles += [Line2D([], [], color="#555555", marker=PATCH_MARKERS.get(p, "o"),
                       linestyle=PATCH_LINES.get(p, "-"), label=f"patch {p}") for p in patch_sizes]
    return handles


# ------------------------------------------------------------------------------------------
# Axes, legends, labels
# ------------------------------------------------------------------------------------------


def legend_outside(ax: Any, handles: list | None = None, labels: list | None = None,
                   title: str | None = None) -> None:
    """The legend right of the axes, never over the data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if labels is None:
        labels = [h.get_label() for h in handles]
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, title_fontsize=8)


def plain_log_ticks(ax: Any, which: str) -> None:
    """Log ticks at 1, 2, 5 × 10^k written as plain numbers (FID 20, 50, 100; loss 0.05, 0.1)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(NullFormatter())


def unit_log_ticks(ax: Any, which: str, kind: str = "flops") -> None:
    """A log axis whose ticks read '10 Mflops' (``kind='flops'``, values in Gflops) or '1.05M'
    (``kind='params'``). Call after the data are drawn: an axis spanning under two decades
    gets 1-2-5 ticks, so it always shows at least two labels."""
    from matplotlib.ticker import LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    span = math.log10(hi / lo) if lo > 0 and hi > 0 else 3.0
    subs = (1.0,) if span >= 2.0 else ((1.0, 3.0) if span >= 1.2 else (1.0, 2.0, 5.0))
    # A unit label is ~10 characters: along x, more than four of them run into each other, so
    # a wide axis labels every second or third decade instead.
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=4 if which == "x" else 8))
    axis.set_major_formatter(flops_formatter() if kind == "flops" else params_formatter())
    axis.set_minor_formatter(NullFormatter())


def log_grid(lo: float, hi: float, pad: float = 0.15, n: int = 200) -> np.ndarray:
    """``n`` log-spaced points from ``lo`` to ``hi``, widened by ``pad`` of the span each side."""
    span = math.log10(hi) - math.log10(lo) or 1.0
    return np.logspace(math.log10(lo) - pad * span, math.log10(hi) + pad * span, n)


def num_text(v: float) -> str:
    return "0" if abs(v) < 1e-6 else f"{v:.3g}"


def label_points(ax: Any, xs: Any, ys: Any, labels: list[str], fontsize: float = 7.0) -> None:
    """Label points, moving a label to another side of its point when it would overlap
    another label or marker. Call it last: it measures the laid-out figure."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.draw_without_rendering()  # run the layout so positions are final
    renderer = fig.canvas.get_renderer()
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    pix = ax.transData.transform(np.column_stack([xs, ys]))
    r = 4.5 * fig.dpi / 72.0  # a marker's half-width in pixels
    obstacles = [Bbox([[px - r, py - r], [px + r, py + r]]) for px, py in pix]
    offsets = [((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom"),
               ((-5, -3), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top"),
               ((9, 0), "left", "center"), ((-9, 0), "right", "center")]
    axbox = ax.get_window_extent(renderer)

    def place(i: int, offset) -> tuple[Any, Any]:
        (dx, dy), ha, va = offset
        text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                           ha=ha, va=va, fontsize=fontsize, color="#333333")
        text.set_in_layout(False)
        return text, text.get_window_extent(renderer)

    for i in np.argsort(xs):
        choice = None
        for offset in offsets:
            text, box = place(i, offset)
            inside = axbox.x0 <= box.x0 and box.x1 <= axbox.x1 and axbox.y0 <= box.y0 and box.y1 <= axbox.y1
            if inside and not any(box.overlaps(b) for b in obstacles):
                choice = box
                break
            text.remove()
        if choice is None:  # every side taken: keep the first choice
            choice = place(i, offsets[0])[1]
        obstacles.append(choice)
