"""The paper's plots from a study's frames (matplotlib, Agg; PNG and SVG).

Every function takes frames from ``analysis.runs`` and an output path *stem*
(``out/fid_vs_gflops`` writes ``out/fid_vs_gflops.png`` and ``.svg``) and returns the paths
it wrote. A FID plot of a study without FID writes nothing and returns ``[]``;
``plot_study`` then says "no FID yet" in its notes and draws what exists (loss curves,
final loss against Gflops).

Colour encodes model size (S, B, L, XL as in the paper), marker and line style the patch size.
Figures are built without pyplot, so plotting leaves no global state behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.schema import FID, LOSS, size_order

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7.5,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "lines.linewidth": 1.6,
    "lines.markersize": 5, "savefig.bbox": "tight", "savefig.pad_inches": 0.05, "svg.fonttype": "path",
    "legend.frameon": False,
}
SIZE_COLORS = {"S": "#4C9BE8", "B": "#2CA02C", "L": "#FF7F0E", "XL": "#D62728"}
_EXTRA_COLORS = ["#9467BD", "#8C564B", "#E377C2", "#17BECF", "#BCBD22", "#7F7F7F"]
PATCH_MARKERS = {2: "o", 4: "s", 8: "^", 1: "D", 16: "v"}
PATCH_LINES = {2: "-", 4: "--", 8: ":", 1: "-.", 16: (0, (5, 1, 1, 1))}
DPI = 200
NO_FID = "no FID yet"


@dataclass
class PlotSet:
    """What ``plot_study`` drew: name -> written paths, and notes for the reader."""

    paths: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def png(self, name: str) -> Path | None:
        return next((p for p in self.paths.get(name, []) if p.suffix == ".png"), None)


# ------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------


def _figure(width: float = 5.0, height: float = 3.6, ncols: int = 1, nrows: int = 1, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        path = stem.with_name(stem.name + f".{ext}")
        fig.savefig(path, dpi=DPI, format=ext, metadata={"Date": None} if ext == "svg" else None)
        out.append(path)
    return out


def _with_style(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _size_color(size: str, order: list[str]) -> str:
    if size in SIZE_COLORS:
        return SIZE_COLORS[size]
    extra = [s for s in order if s not in SIZE_COLORS]
    return _EXTRA_COLORS[extra.index(size) % len(_EXTRA_COLORS)] if size in extra else "#333333"


def _sizes(df: pd.DataFrame) -> list[str]:
    present = [str(s) for s in pd.unique(df["size"].dropna())] if "size" in df else []
    order = size_order()
    return [s for s in order if s in present] + sorted(s for s in present if s not in order)


def _patches(df: pd.DataFrame) -> list[Any]:
    if "patch_size" not in df:
        return []
    return sorted({int(p) for p in df["patch_size"].dropna()})


def _style_of(row: Any, sizes: list[str]) -> dict[str, Any]:
    patch = row.get("patch_size")
    patch = int(patch) if patch is not None and not pd.isna(patch) else None
    return {"color": _size_color(str(row.get("size")), sizes),
            "marker": PATCH_MARKERS.get(patch, "o"), "linestyle": PATCH_LINES.get(patch, "-")}


def _model_order(df: pd.DataFrame) -> list[str]:
    """Trials ordered by Gflops (the paper's reading order)."""
    first = df.groupby("trial", sort=False)["gflops"].first().sort_values(kind="mergesort")
    return list(first.index)


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df and bool(pd.to_numeric(df[col], errors="coerce").notna().any())


def _label_points(ax, xs, ys, labels, fontsize: float = 7.0) -> None:
    """Label points, moving a label to another side of its point when it would overlap
    another label or marker. Call it last: it measures the laid-out figure."""
    fig = ax.figure
    fig.draw_without_rendering()  # run the layout so positions are final
    renderer = fig.canvas.get_renderer()
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    from matplotlib.transforms import Bbox

    pix = ax.transData.transform(np.column_stack([xs, ys]))
    r = 4.5 * fig.dpi / 72.0  # a marker's half-width in pixels
    obstacles = [Bbox([[px - r, py - r], [px + r, py + r]]) for px, py in pix]
    offsets = [((5, 3), "left", "bottom"), ((5, -3), "left", "top"), ((-5, 3), "right", "bottom"),
               ((-5, -3), "right", "top"), ((0, 7), "center", "bottom"), ((0, -7), "center", "top"),
               ((9, 0), "left", "center"), ((-9, 0), "right", "center")]
    axbox = ax.get_window_extent(renderer)
    for i in np.argsort(xs):
        choice = None
        for (dx, dy), ha, va in offsets:
            text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=fontsize, color="#333333")
            text.set_in_layout(False)
            box = text.get_window_extent(renderer)
            inside = axbox.x0 <= box.x0 and box.x1 <= axbox.x1 and axbox.y0 <= box.y0 and box.y1 <= axbox.y1
            if inside and not any(box.overlaps(b) for b in obstacles):
                choice = box
                break
            text.remove()
        if choice is None:  # every side taken: keep the first choice
            (dx, dy), ha, va = offsets[0]
            text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=fontsize, color="#333333")
            text.set_in_layout(False)
            choice = text.get_window_extent(renderer)
        obstacles.append(choice)


def _num_text(v: float) -> str:
    return "0" if abs(v) < 1e-6 else f"{v:.3g}"


def _log_grid(lo: float, hi: float, pad: float = 0.15, n: int = 200) -> np.ndarray:
    span = math.log10(hi) - math.log10(lo) or 1.0
    return np.logspace(math.log10(lo) - pad * span, math.log10(hi) + pad * span, n)


def _legend_outside(ax, handles=None, labels=None, title=None) -> None:
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, title_fontsize=8)


def _size_patch_handles(sizes: list[str], patches: list[int]):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_size_color(s, sizes), lw=2.5, label=f"DiT-{s}" if s in SIZE_COLORS else s)
               for s in sizes]
    handles += [Line2D([], [], color="#555555", marker=PATCH_MARKERS.get(p, "o"),
                       linestyle=PATCH_LINES.get(p, "-"), label=f"patch {p}") for p in patches]
    return handles


# ------------------------------------------------------------------------------------------
# FID vs Gflops
# ------------------------------------------------------------------------------------------


@_with_style
def plot_fid_vs_gflops(evals: pd.DataFrame, stem: str | Path, *, fit=None, step: int | None = None,
                       reference: pd.DataFrame | None = None, reference_label: str = "published",
                       title: str | None = None) -> list[Path]:
    """FID against forward Gflops at one step, points labelled by model, with the fitted
    power law and its bootstrap band. ``reference`` (a published table's ``evals``) is drawn
    as hollow grey points beside the study."""
    from analysis.fit import at_step

    if not _has(evals, FID) and (reference is None or not _has(reference, FID)):
        return []
    step = fit.step if fit is not None and step is None else step
    rows, step, _ = at_step(evals, step) if _has(evals, FID) else (evals.iloc[0:0], None, None)
    fig, axes = _figure(5.4, 3.8)
    ax = axes[0, 0]
    sizes = _sizes(pd.concat([rows, reference]) if reference is not None else rows)
    to_label = rows
    if reference is not None and _has(reference, FID):
        ref, _, _ = at_step(reference)
        ax.scatter(ref["gflops"], ref[FID], s=30, facecolors="none", edgecolors="#888888", linewidths=1.0,
                   label=reference_label, zorder=2)
        if not len(rows):
            to_label = ref
    for _, row in rows.iterrows():
        st = _style_of(row, sizes)
        ax.scatter([row["gflops"]], [row[FID]], color=st["color"], marker=st["marker"], s=34, zorder=3,
                   edgecolors="white", linewidths=0.5)
    if len(rows):
        to_label = rows
    if fit is not None:
        grid = _log_grid(fit.used["x"].min(), fit.used["x"].max(), pad=0.08)
        pred = fit.predict(grid)
        ax.fill_between(grid, pred["lo"], pred["hi"], color="#444444", alpha=0.12, lw=0,
                        label=f"{fit.level:.0%} bootstrap band")
        ax.plot(grid, pred.iloc[:, 1], color="#222222", lw=1.2,
                label=f"FID ∝ Gflops$^{{{fit.b:.3f}}}$ [{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}]\n"
                      f"r(log Gflops, FID) = {fit.r_y:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax, "y")
    ax.set_xlabel("Transformer Gflops (forward pass)")
    ax.set_ylabel("FID" + (f" @ {step:,} steps" if step is not None else ""))
    ax.set_title(title or "FID vs model Gflops")
    handles, labels = ax.get_legend_handles_labels()
    extra = _size_patch_handles(_sizes(rows), _patches(rows)) if len(rows) else []
    _legend_outside(ax, handles + extra, labels + [h.get_label() for h in extra])
    _label_points(ax, to_label["gflops"].to_numpy(float), to_label[FID].to_numpy(float),
                  to_label["model"].astype(str).tolist())
    return _save(fig, stem)


def _plain_log_ticks(ax, which: str) -> None:
    from matplotlib.ticker import LogLocator, ScalarFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(_null_formatter())


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


# ------------------------------------------------------------------------------------------
# FID vs training compute
# ------------------------------------------------------------------------------------------


@_with_style
def plot_fid_vs_compute(evals: pd.DataFrame, stem: str | Path, *, fit=None, frontier: pd.DataFrame | None = None,
                        reference: pd.DataFrame | None = None, reference_label: str = "published",
                        title: str | None = None) -> list[Path]:
    """FID against training compute (Gflops), one curve per model, the compute-efficient
    frontier, and the saturating fit with its band when given."""
    from analysis.fit import compute_frontier

    if not _has(evals, FID):
        return []
    pts = evals.dropna(subset=[FID, "compute_gflops"])
    sizes, patches = _sizes(pts), _patches(pts)
    fig, axes = _figure(5.8, 3.8)
    ax = axes[0, 0]
    for trial in _model_order(pts):
        g = pts[pts["trial"] == trial].sort_values("compute_gflops")
        st = _style_of(g.iloc[0], sizes)
        ax.plot(g["compute_gflops"], g[FID], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markersize=3.2 if len(g) > 1 else 5, lw=1.3, alpha=0.9)
    front = compute_frontier(pts) if frontier is None else frontier
    if len(front) > 1:
        ax.step(front["compute_gflops"], front[FID], where="post", color="black", lw=1.0, alpha=0.7,
                label="compute-efficient frontier")
    if fit is not None:
        grid = _log_grid(fit.used["compute"].min(), fit.used["compute"].max(), pad=0.05)
        pred = fit.predict(grid)
        ax.fill_between(grid, pred["lo"], pred["hi"], color="#7F3FBF", alpha=0.12, lw=0)
        ax.plot(grid, pred.iloc[:, 1], color="#7F3FBF", lw=1.4, linestyle=(0, (4, 2)),
                label=f"FID = {_num_text(fit.E)} + A·C$^{{-{fit.alpha:.3f}}}$ (Huber fit)")
    if reference is not None and _has(reference, FID):
        ax.scatter(reference["compute_gflops"], reference[FID], s=26, facecolors="none", edgecolors="#888888",
                   linewidths=1.0, label=reference_label, zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax, "y")
    ax.set_xlabel("Training compute (Gflops = Gflops/img × 3 × batch × steps)")
    ax.set_ylabel("FID")
    ax.set_title(title or "FID vs training compute")
    handles, labels = ax.get_legend_handles_labels()
    extra = _size_patch_handles(sizes, patches)
    _legend_outside(ax, extra + handles, [h.get_label() for h in extra] + labels)
    if len(pts["trial"].unique()) <= 14 and pts.groupby("trial").size().max() == 1:
        _label_points(ax, pts["compute_gflops"].to_numpy(float), pts[FID].to_numpy(float),
                      pts["model"].astype(str).tolist())
    return _save(fig, stem)


# ------------------------------------------------------------------------------------------
# FID vs training step, grouped two ways
# ------------------------------------------------------------------------------------------


@_with_style
def plot_fid_vs_step(evals: pd.DataFrame, stem: str | Path) -> list[Path]:
    """FID over training steps, as the paper's Figure 6: ``<stem>_by_patch`` holds patch size
    fixed per panel (curves = model sizes); ``<stem>_by_size`` holds model size fixed
    (curves = patch sizes)."""
    if not _has(evals, FID):
        return []
    pts = evals.dropna(subset=[FID]).copy()
    pts["patch_key"] = pts["patch_size"].map(lambda p: "?" if pd.isna(p) else int(p))
    sizes, patches = _sizes(pts), sorted({p for p in pts["patch_key"] if p != "?"}) + (
        ["?"] if (pts["patch_key"] == "?").any() else [])
    written: list[Path] = []
    for mode, panels, key in (("by_patch", patches, "patch_key"), ("by_size", sizes, "size")):
        n = max(1, len(panels))
        fig, axes = _figure(min(3.0 * n, 12.0), 3.1, ncols=n, sharey=True)
        for ax, panel in zip(axes[0], panels):
            sub = pts[pts[key] == panel]
            for trial in _model_order(sub):
                g = sub[sub["trial"] == trial].sort_values("step")
                st = _style_of(g.iloc[0], sizes)
                label = (f"DiT-{g.iloc[0]['size']}" if mode == "by_patch" else f"patch {g.iloc[0]['patch_key']}")
                ax.plot(g["step"].astype(float), g[FID], color=st["color"], linestyle=st["linestyle"],
                        marker=st["marker"], markersize=3.2, label=label if len(sub["trial"].unique()) < 9 else None)
            ax.set_title(f"patch size {panel}" if mode == "by_patch" else
                         (f"DiT-{panel}" if panel in SIZE_COLORS else str(panel)))
            ax.set_yscale("log")
            _plain_log_ticks(ax, "y")
            ax.set_xlabel("training step")
            ax.xaxis.set_major_formatter(_step_formatter())
            ax.legend(loc="upper right")
        axes[0, 0].set_ylabel("FID")
        fig.suptitle("FID over training, " + ("holding patch size fixed" if mode == "by_patch"
                                              else "holding model size fixed"), fontsize=10)
        written += _save(fig, f"{stem}_{mode}")
    return written


def _step_formatter():
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        if abs(v) >= 1e6:
            return f"{v / 1e6:g}M"
        if abs(v) >= 1e3:
            return f"{v / 1e3:g}K"
        return f"{v:g}"

    return FuncFormatter(fmt)


# ------------------------------------------------------------------------------------------
# Training loss
# ------------------------------------------------------------------------------------------


def _binned(x: np.ndarray, y: np.ndarray, n_bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Median of y in bins of x that are both log- and linearly spaced, so a curve reads
    well on a log axis (fine early) and a linear one (fine late)."""
    if len(x) <= 2 * n_bins:
        return x, y
    lo, hi = max(float(x.min()), 1e-12), float(x.max())
    edges = np.unique(np.concatenate([np.geomspace(lo, hi, n_bins + 1), np.linspace(lo, hi, n_bins + 1)]))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    frame = pd.DataFrame({"b": idx, "x": x, "y": y}).groupby("b").median()
    return frame["x"].to_numpy(), frame["y"].to_numpy()


def _thin(x: np.ndarray, y: np.ndarray, most: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    stride = max(1, len(x) // most)
    return x[::stride], y[::stride]


@_with_style
def plot_loss_curves(losses: pd.DataFrame, stem: str | Path, *, title: str | None = None) -> list[Path]:
    """Training loss per trial against step (left) and training compute (right): binned
    medians over a faint (thinned) raw line."""
    if not _has(losses, LOSS):
        return []
    pts = losses.dropna(subset=[LOSS])
    sizes, patches = _sizes(pts), _patches(pts)
    fig, axes = _figure(8.4, 3.2, ncols=2, sharey=True)
    for trial in _model_order(pts):
        g = pts[pts["trial"] == trial].sort_values("step")
        st = _style_of(g.iloc[0], sizes)
        y = g[LOSS].to_numpy(float)
        for ax, x in ((axes[0, 0], g["step"].to_numpy(float)), (axes[0, 1], g["compute_gflops"].to_numpy(float))):
            if len(y) > 160:
                ax.plot(*_thin(x, y), color=st["color"], lw=0.5, alpha=0.2)
            ax.plot(*_binned(x, y), color=st["color"], linestyle=st["linestyle"], lw=1.3,
                    label=str(g.iloc[0]["model"]) if ax is axes[0, 1] else None)
    axes[0, 0].set_xlabel("training step")
    axes[0, 0].xaxis.set_major_formatter(_step_formatter())
    axes[0, 0].set_ylabel("training loss")
    axes[0, 1].set_xscale("log")
    axes[0, 1].set_xlabel("training compute (Gflops)")
    if len(pts["trial"].unique()) <= 14:
        _legend_outside(axes[0, 1])
    else:
        _legend_outside(axes[0, 1], _size_patch_handles(sizes, patches),
                        [h.get_label() for h in _size_patch_handles(sizes, patches)])
    fig.suptitle(title or "Training loss", fontsize=10)
    return _save(fig, stem)


@_with_style
def plot_loss_vs_gflops(trials: pd.DataFrame, stem: str | Path, *, column: str = "final_loss_avg",
                        title: str | None = None) -> list[Path]:
    """Final training loss (mean of the last tenth of the history) against model Gflops."""
    if not _has(trials, column) or not _has(trials, "gflops"):
        return []
    rows = trials.dropna(subset=[column, "gflops"])
    sizes = _sizes(rows)
    fig, axes = _figure(5.0, 3.5)
    ax = axes[0, 0]
    for _, row in rows.iterrows():
        st = _style_of(row, sizes)
        ax.scatter([row["gflops"]], [row[column]], color=st["color"], marker=st["marker"], s=34, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("Transformer Gflops (forward pass)")
    ax.set_ylabel("final training loss")
    ax.set_title(title or "Final training loss vs model Gflops")
    extra = _size_patch_handles(sizes, _patches(rows))
    _legend_outside(ax, extra, [h.get_label() for h in extra])
    _label_points(ax, rows["gflops"].to_numpy(float), rows[column].to_numpy(float),
                  rows["model"].astype(str).tolist())
    return _save(fig, stem)


# ------------------------------------------------------------------------------------------
# Everything for one study
# ------------------------------------------------------------------------------------------


def plot_study(data, out_dir: str | Path, *, fits: dict[str, Any] | None = None, reference=None) -> PlotSet:
    """Every plot that the study's data allow, into ``out_dir``; notes say what is missing.

    ``data`` is a ``StudyData``; ``fits`` may hold ``"gflops"`` (PowerLawFit) and
    ``"compute"`` (SaturatingFit); ``reference`` is a published ``StudyData`` to overlay.
    """
    out = Path(out_dir)
    fits = fits or {}
    result = PlotSet()
    ref_evals = reference.evals if reference is not None else None
    ref_label = reference.name if reference is not None else "published"
    if data.has_fid or (ref_evals is not None and _has(ref_evals, FID)):
        result.paths["fid_vs_gflops"] = plot_fid_vs_gflops(
            data.evals, out / "fid_vs_gflops", fit=fits.get("gflops"), reference=ref_evals,
            reference_label=ref_label, title=f"{data.name}: FID vs model Gflops")
    if data.has_fid:
        result.paths["fid_vs_compute"] = plot_fid_vs_compute(
            data.evals, out / "fid_vs_compute", fit=fits.get("compute"),
            title=f"{data.name}: FID vs training compute")
        if data.evals.dropna(subset=[FID]).groupby("trial").size().max() > 1:
            result.paths["fid_vs_step"] = plot_fid_vs_step(data.evals, out / "fid_vs_step")
    else:
        result.notes.append(f"{NO_FID}: the FID plots are left out until a trial logs eval/fid")
    if _has(data.losses, LOSS):
        result.paths["loss_curves"] = plot_loss_curves(data.losses, out / "loss_curves",
                                                       title=f"{data.name}: training loss")
        result.paths["loss_vs_gflops"] = plot_loss_vs_gflops(data.trials, out / "loss_vs_gflops")
    elif data.source != "published":
        result.notes.append("no training loss logged yet")
    result.paths = {k: v for k, v in result.paths.items() if v}
    return result
