"""The paper's plots from a study's frames (matplotlib, Agg; PNG and SVG).

Every ``plot_*`` function takes frames from ``analysis.runs`` and an output path *stem*
(``out/fid_vs_gflops`` writes ``out/fid_vs_gflops.png`` and ``.svg``) and returns the paths
it wrote; its ``*_figure`` twin builds the same figure without saving it (None when there is
nothing to draw), so a test can read the axes back. A FID plot of a study without FID writes
nothing and returns ``[]``; ``plot_study`` then says "no FID yet" in its notes and draws what
exists (loss curves, final loss against Gflops).

Colour encodes model size (ordered by size, bigger = darker; ``analysis.plot_style``), marker
and line style the patch size. Flops and compute print in readable units (``analysis.units``);
compute is in the project's Gflops, which count multiply-adds (FLOPs = 2×), and says so.
The fitted laws, residuals, backtests and the sample gallery live in ``analysis.plots_laws``
and ``analysis.gallery``; ``plot_study`` draws them too when given their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.plot_style import (
    DPI,
    PATCH_LINES,
    PATCH_MARKERS,
    REFERENCE_COLOR,
    STYLE,
    figure,
    has,
    label_points,
    legend_outside,
    log_grid,
    model_order,
    num_text,
    ordered_sizes,
    patches,
    plain_log_ticks,
    save,
    size_label,
    size_patch_handles,
    style_of,
    unit_log_ticks,
    with_style,
)
from analysis.schema import FID, LOSS
from analysis.units import COMPUTE_LABEL, FORWARD_LABEL

__all__ = ["DPI", "NO_FID", "PATCH_LINES", "PATCH_MARKERS", "PlotSet", "STYLE", "fid_vs_compute_figure",
           "fid_vs_gflops_figure", "loss_curves_figure", "loss_vs_gflops_figure", "plot_fid_vs_compute",
           "plot_fid_vs_gflops", "plot_fid_vs_step", "plot_loss_curves", "plot_loss_vs_gflops", "plot_study"]

NO_FID = "no FID yet"


@dataclass
class PlotSet:
    """What ``plot_study`` drew: name -> written paths, and notes for the reader."""

    paths: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def png(self, name: str) -> Path | None:
        return next((p for p in self.paths.get(name, []) if p.suffix == ".png"), None)


def _saved(fig: Any, stem: str | Path) -> list[Path]:
    return [] if fig is None else with_style(save)(fig, stem)


def _reference_frame(reference: Any) -> tuple[pd.DataFrame | None, str | None]:
    """A published table's evals and name, from a StudyData or from its evals frame."""
    if reference is None:
        return None, None
    if isinstance(reference, pd.DataFrame):
        return reference, None
    return reference.evals, getattr(reference, "name", None)


def _draw_law(ax, fit: Any, x_col: str, *, color: str, label: str, pad: float = 0.05,
              linestyle: Any = (0, (4, 2)), band: bool = True) -> None:
    """A fitted law's curve over its fitted range (plus ``pad``), with its band when it has one."""
    xs = pd.to_numeric(fit.used[x_col], errors="coerce").dropna()
    if not len(xs) or xs.min() <= 0:
        return
    grid = log_grid(xs.min(), xs.max(), pad=pad)
    pred = fit.predict(grid)
    y_name = getattr(fit, "y_name", None)
    mid = pred[y_name] if y_name in pred else pred.iloc[:, 1]
    if band and {"lo", "hi"} <= set(pred) and pred["lo"].notna().any():
        level = getattr(fit, "level", None)
        ax.fill_between(grid, pred["lo"], pred["hi"], color=color, alpha=0.12, lw=0,
                        label=f"{level:.0%} bootstrap band" if level else "bootstrap band")
    ax.plot(grid, mid, color=color, lw=1.3, linestyle=linestyle, label=label)


def _saturating_label(fit: Any, prefix: str = "") -> str:
    if all(hasattr(fit, k) for k in ("E", "alpha")):
        return f"{prefix}FID = {num_text(fit.E)} + A·C$^{{-{fit.alpha:.3f}}}$ (Huber fit)"
    return f"{prefix}saturating fit"


# ------------------------------------------------------------------------------------------
# FID vs Gflops
# ------------------------------------------------------------------------------------------


@with_style
def fid_vs_gflops_figure(evals: pd.DataFrame, *, fit: Any = None, step: int | None = None,
                         reference: Any = None, reference_label: str = "published",
                         title: str | None = None) -> Any:
    """The figure of :func:`plot_fid_vs_gflops`, unsaved; None when there is no FID."""
    from analysis.fit import at_step

    reference, ref_name = _reference_frame(reference)
    reference_label = ref_name or reference_label
    if not has(evals, FID) and not has(reference, FID):
        return None
    step = fit.step if fit is not None and step is None else step
    rows, step, _ = at_step(evals, step) if has(evals, FID) else (evals.iloc[0:0], None, None)
    fig, axes = figure(5.4, 3.8)
    ax = axes[0, 0]
    sizes = ordered_sizes(rows)
    to_label = rows
    if has(reference, FID):
        ref, _, _ = at_step(reference)
        ax.scatter(ref["gflops"], ref[FID], s=30, facecolors="none", edgecolors=REFERENCE_COLOR, linewidths=1.0,
                   label=reference_label, zorder=2)
        if not len(rows):
            to_label = ref
    for _, row in rows.iterrows():
        st = style_of(row, sizes)
        ax.scatter([row["gflops"]], [row[FID]], color=st["color"], marker=st["marker"], s=34, zorder=3,
                   edgecolors="white", linewidths=0.5)
    if fit is not None:
        _draw_law(ax, fit, "x", color="#222222", pad=0.08, linestyle="-",
                  label=f"FID ∝ Gflops$^{{{fit.b:.3f}}}$ [{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}]\n"
                        f"r(log Gflops, FID) = {fit.r_y:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "y")
    unit_log_ticks(ax, "x", "flops")
    ax.set_xlabel(FORWARD_LABEL)
    ax.set_ylabel("FID" + (f" @ {step:,} steps" if step is not None else ""))
    ax.set_title(title or "FID vs model Gflops")
    handles, _ = ax.get_legend_handles_labels()
    legend_outside(ax, handles + (size_patch_handles(sizes, patches(rows)) if len(rows) else []))
    label_points(ax, to_label["gflops"].to_numpy(float), to_label[FID].to_numpy(float),
                 to_label["model"].astype(str).tolist())
    return fig


def plot_fid_vs_gflops(evals: pd.DataFrame, stem: str | Path, **kw: Any) -> list[Path]:
    """FID against forward Gflops at one step, points labelled by model, with the fitted
    power law and its bootstrap band. ``reference`` (a published table's ``evals`` or
    ``StudyData``) is drawn as hollow grey points beside the study. Keywords as
    :func:`fid_vs_gflops_figure` (fit, step, reference, reference_label, title)."""
    return _saved(fid_vs_gflops_figure(evals, **kw), stem)


# ------------------------------------------------------------------------------------------
# FID vs training compute
# ------------------------------------------------------------------------------------------


def _draw_reference(ax, ref: pd.DataFrame, label: str) -> None:
    """A published table's points in grey, hollow, one marker per patch, under one legend entry."""
    pts = ref.dropna(subset=[FID, "compute_gflops"])
    for i, (patch, g) in enumerate(pts.groupby(pts["patch_size"].fillna(0).astype(int), sort=True)
                                   if "patch_size" in pts else [(None, pts)]):
        ax.scatter(g["compute_gflops"], g[FID], s=28, facecolors="none", edgecolors=REFERENCE_COLOR,
                   marker=PATCH_MARKERS.get(patch, "o"), linewidths=1.0, zorder=2,
                   label=label if i == 0 else None)


@with_style
def fid_vs_compute_figure(evals: pd.DataFrame, *, fit: Any = None, frontier: pd.DataFrame | None = None,
                          reference: Any = None, reference_label: str = "published", reference_fit: Any = None,
                          title: str | None = None) -> Any:
    """The figure of :func:`plot_fid_vs_compute`, unsaved; None when the study has no FID."""
    from analysis.fit import compute_frontier

    if not has(evals, FID):
        return None
    reference, ref_name = _reference_frame(reference)
    reference_label = ref_name or reference_label
    pts = evals.dropna(subset=[FID, "compute_gflops"])
    sizes = ordered_sizes(pts)
    fig, axes = figure(6.2, 3.9)
    ax = axes[0, 0]
    for trial in model_order(pts, sizes):
        g = pts[pts["trial"] == trial].sort_values("compute_gflops")
        st = style_of(g.iloc[0], sizes)
        ax.plot(g["compute_gflops"], g[FID], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markersize=3.2 if len(g) > 1 else 5, lw=1.3, alpha=0.9)
    front = compute_frontier(pts) if frontier is None else frontier
    if len(front) > 1:
        ax.step(front["compute_gflops"], front[FID], where="post", color="black", lw=1.0, alpha=0.7,
                label="compute-efficient frontier")
    if fit is not None:
        _draw_law(ax, fit, "compute", color="#7F3FBF", label=_saturating_label(fit))
    if has(reference, FID):
        _draw_reference(ax, reference, reference_label)
        if reference_fit is not None:
            _draw_law(ax, reference_fit, "compute", color=REFERENCE_COLOR, linestyle=(0, (1, 1.5)), band=False,
                      label=_saturating_label(reference_fit, f"{reference_label}: "))
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "y")
    unit_log_ticks(ax, "x", "flops")
    ax.set_xlabel(COMPUTE_LABEL + "\n= forward flops/img × 3 × batch × steps")
    ax.set_ylabel("FID")
    ax.set_title(title or "FID vs training compute")
    handles, _ = ax.get_legend_handles_labels()
    legend_outside(ax, size_patch_handles(sizes, patches(pts)) + handles)
    if len(pts["trial"].unique()) <= 14 and pts.groupby("trial").size().max() == 1:
        label_points(ax, pts["compute_gflops"].to_numpy(float), pts[FID].to_numpy(float),
                     pts["model"].astype(str).tolist())
    return fig


def plot_fid_vs_compute(evals: pd.DataFrame, stem: str | Path, **kw: Any) -> list[Path]:
    """FID against training compute, one curve per model, the compute-efficient frontier, and
    the saturating fit with its band when given. ``reference`` (a published ``StudyData`` or
    its evals) adds the published points, and ``reference_fit`` its law, in grey. Keywords as
    :func:`fid_vs_compute_figure`."""
    return _saved(fid_vs_compute_figure(evals, **kw), stem)


# ------------------------------------------------------------------------------------------
# FID vs training step, grouped two ways
# ------------------------------------------------------------------------------------------


def _step_formatter():
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        if abs(v) >= 1e6:
            return f"{v / 1e6:g}M"
        if abs(v) >= 1e3:
            return f"{v / 1e3:g}K"
        return f"{v:g}"

    return FuncFormatter(fmt)


def _step_panel(ax, sub: pd.DataFrame, sizes: list[str]) -> None:
    for trial in model_order(sub, sizes):
        g = sub[sub["trial"] == trial].sort_values("step")
        st = style_of(g.iloc[0], sizes)
        ax.plot(g["step"].astype(float), g[FID], color=st["color"], linestyle=st["linestyle"],
                marker=st["marker"], markersize=3.2)
    ax.set_yscale("log")
    plain_log_ticks(ax, "y")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_formatter(_step_formatter())


@with_style
def plot_fid_vs_step(evals: pd.DataFrame, stem: str | Path) -> list[Path]:
    """FID over training steps, as the paper's Figure 6: ``<stem>_by_patch`` holds patch size
    fixed per panel (curves = model sizes); ``<stem>_by_size`` holds model size fixed
    (curves = patch sizes). One legend, right of the last panel."""
    if not has(evals, FID):
        return []
    pts = evals.dropna(subset=[FID]).copy()
    pts["patch_key"] = pts["patch_size"].map(lambda p: "?" if pd.isna(p) else int(p))
    sizes = ordered_sizes(pts)
    patch_keys = sorted({p for p in pts["patch_key"] if p != "?"}) + (
        ["?"] if (pts["patch_key"] == "?").any() else [])
    written: list[Path] = []
    for mode, panels, key in (("by_patch", patch_keys, "patch_key"), ("by_size", sizes, "size")):
        n = max(1, len(panels))
        fig, axes = figure(min(3.0 * n, 12.0) + 0.9, 3.1, ncols=n, sharey=True)
        for ax, panel in zip(axes[0], panels):
            _step_panel(ax, pts[pts[key] == panel], sizes)
            ax.set_title(f"patch size {panel}" if mode == "by_patch" else size_label(panel))
        axes[0, 0].set_ylabel("FID")
        # Each panel's curves differ only in what the panel does not hold fixed: one legend serves all.
        legend_outside(axes[0, -1], size_patch_handles(sizes, []) if mode == "by_patch"
                       else size_patch_handles([], patches(pts)))
        fig.suptitle("FID over training, " + ("holding patch size fixed" if mode == "by_patch"
                                              else "holding model size fixed"), fontsize=10)
        written += save(fig, f"{stem}_{mode}")
    return written


# ------------------------------------------------------------------------------------------
# Training loss (log axes: the loss is positive and falls like a power of steps and compute)
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


@with_style
def loss_curves_figure(losses: pd.DataFrame, *, title: str | None = None) -> Any:
    """The figure of :func:`plot_loss_curves`, unsaved; None when no loss was logged."""
    if not has(losses, LOSS):
        return None
    pts = losses.dropna(subset=[LOSS])
    # A log axis cannot show step 0 or a non-positive loss; neither says anything about a trend.
    pts = pts[(pd.to_numeric(pts[LOSS], errors="coerce") > 0) & (pd.to_numeric(pts["step"]) > 0)]
    if not len(pts):
        return None
    sizes = ordered_sizes(pts)
    fig, axes = figure(8.8, 3.3, ncols=2, sharey=True)
    for trial in model_order(pts, sizes):
        g = pts[pts["trial"] == trial].sort_values("step")
        st = style_of(g.iloc[0], sizes)
        y = g[LOSS].to_numpy(float)
        for ax, x in ((axes[0, 0], g["step"].to_numpy(float)), (axes[0, 1], g["compute_gflops"].to_numpy(float))):
            if len(y) > 160:
                ax.plot(*_thin(x, y), color=st["color"], lw=0.5, alpha=0.2)
            ax.plot(*_binned(x, y), color=st["color"], linestyle=st["linestyle"], lw=1.3,
                    label=str(g.iloc[0]["model"]) if ax is axes[0, 1] else None)
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_yscale("log")
    plain_log_ticks(axes[0, 0], "y")
    axes[0, 0].set_xlabel("training step")
    axes[0, 0].xaxis.set_major_formatter(_step_formatter())
    axes[0, 0].set_ylabel("training loss")
    unit_log_ticks(axes[0, 1], "x", "flops")
    axes[0, 1].set_xlabel(COMPUTE_LABEL)
    if len(pts["trial"].unique()) <= 14:
        legend_outside(axes[0, 1])
    else:
        legend_outside(axes[0, 1], size_patch_handles(sizes, patches(pts)))
    fig.suptitle(title or "Training loss", fontsize=10)
    return fig


def plot_loss_curves(losses: pd.DataFrame, stem: str | Path, *, title: str | None = None) -> list[Path]:
    """Training loss per trial against step (left) and training compute (right), log-log:
    binned medians over a faint (thinned) raw line."""
    return _saved(loss_curves_figure(losses, title=title), stem)


@with_style
def loss_vs_gflops_figure(trials: pd.DataFrame, *, column: str = "final_loss_avg",
                          title: str | None = None) -> Any:
    """The figure of :func:`plot_loss_vs_gflops`, unsaved; None without losses or Gflops."""
    if not has(trials, column) or not has(trials, "gflops"):
        return None
    rows = trials.dropna(subset=[column, "gflops"])
    rows = rows[pd.to_numeric(rows[column], errors="coerce") > 0]
    if not len(rows):
        return None
    sizes = ordered_sizes(rows)
    fig, axes = figure(5.2, 3.5)
    ax = axes[0, 0]
    for _, row in rows.iterrows():
        st = style_of(row, sizes)
        ax.scatter([row["gflops"]], [row[column]], color=st["color"], marker=st["marker"], s=34, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "y")
    unit_log_ticks(ax, "x", "flops")
    ax.set_xlabel(FORWARD_LABEL)
    ax.set_ylabel("final training loss")
    ax.set_title(title or "Final training loss vs model Gflops")
    legend_outside(ax, size_patch_handles(sizes, patches(rows)))
    label_points(ax, rows["gflops"].to_numpy(float), rows[column].to_numpy(float),
                 rows["model"].astype(str).tolist())
    return fig


def plot_loss_vs_gflops(trials: pd.DataFrame, stem: str | Path, *, column: str = "final_loss_avg",
                        title: str | None = None) -> list[Path]:
    """Final training loss (mean of the last tenth of the history) against model Gflops, log-log."""
    return _saved(loss_vs_gflops_figure(trials, column=column, title=title), stem)


# ------------------------------------------------------------------------------------------
# Everything for one study
# ------------------------------------------------------------------------------------------


def _fid_plots(data, out: Path, fits: dict[str, Any], reference, reference_fit, result: PlotSet) -> None:
    ref_evals, _ = _reference_frame(reference)
    ref_label = getattr(reference, "name", None) or "published"
    if data.has_fid or has(ref_evals, FID):
        result.paths["fid_vs_gflops"] = plot_fid_vs_gflops(
            data.evals, out / "fid_vs_gflops", fit=fits.get("gflops"), reference=ref_evals,
            reference_label=ref_label, title=f"{data.name}: FID vs model Gflops")
    if not data.has_fid:
        result.notes.append(f"{NO_FID}: the FID plots are left out until a trial logs eval/fid")
        return
    result.paths["fid_vs_compute"] = plot_fid_vs_compute(
        data.evals, out / "fid_vs_compute", fit=fits.get("compute"), reference=ref_evals,
        reference_label=ref_label, reference_fit=reference_fit, title=f"{data.name}: FID vs training compute")
    if data.evals.dropna(subset=[FID]).groupby("trial").size().max() > 1:
        result.paths["fid_vs_step"] = plot_fid_vs_step(data.evals, out / "fid_vs_step")
    ref_protocol = getattr(reference, "protocol", "")
    if has(ref_evals, FID) and ref_protocol and data.protocol and ref_protocol != data.protocol:
        result.notes.append(f"the grey points ({ref_label}) use another FID protocol ({ref_protocol}) than "
                            f"this study ({data.protocol}): compare their slopes, not their FID values")


def _with_cells(frame: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the size, patch_size, params and gflops it lacks filled in from the
    trials, where a ``label`` column names them by model or trial (a fit's ``used`` frame and a
    backtest's table do): colours by patch and sizes ordered by params need them."""
    missing = [c for c in ("size", "patch_size", "params", "gflops") if c not in frame and c in trials]
    if not missing or "label" not in frame or not len(trials):
        return frame
    key = frame["label"].astype(str).str.split("@").str[0]  # 'DiT-S/2@400000' -> 'DiT-S/2'
    out = frame.copy()
    for col in missing:
        by_model = dict(zip(trials["model"].astype(str), trials[col])) if "model" in trials else {}
        by_trial = dict(zip(trials["trial"].astype(str), trials[col])) if "trial" in trials else {}
        out[col] = [by_model.get(k, by_trial.get(k)) for k in key]
    return out


def _law_plots(data, out: Path, result: PlotSet, *, backtest, frontier_law, residuals, grids) -> None:
    from analysis.gallery import plot_sample_gallery
    from analysis.plots_laws import plot_backtest, plot_frontier_law, plot_residuals

    if grids:
        result.paths["gallery"] = plot_sample_gallery(data.trials, grids, out / "gallery",
                                                      title=f"{data.name}: last sample grid of each cell")
    if residuals is not None and len(residuals):
        x = next((c for c in ("x", "compute", "compute_gflops", "gflops") if c in residuals), "x")
        result.paths["residuals"] = plot_residuals(_with_cells(residuals, data.trials), out / "residuals", x=x,
                                                   title=f"{data.name}: residuals of the fit")
    if backtest is not None and backtest[0] is not None and len(backtest[0]):
        result.paths["backtest"] = plot_backtest(_with_cells(backtest[0], data.trials), out / "backtest",
                                                 holdout=backtest[1])
    if frontier_law is not None and frontier_law[0] is not None and len(frontier_law[0]):
        result.paths["frontier_law"] = plot_frontier_law(data.evals, frontier_law[0], out / "frontier_law",
                                                         minima=frontier_law[1])


def plot_study(data: Any, out_dir: str | Path, *, fits: dict[str, Any] | None = None, reference: Any = None,
               reference_fit: Any = None, backtest: tuple[pd.DataFrame, dict | None] | None = None,
               frontier_law: tuple[pd.DataFrame, pd.DataFrame | None] | None = None,
               residuals: pd.DataFrame | None = None, grids: dict[str, Path] | None = None) -> PlotSet:
    """Every plot that the study's data (and the given extras) allow, into ``out_dir``; notes
    say what is missing.

    ``data`` is a ``StudyData``; ``fits`` may hold ``"gflops"`` (PowerLawFit) and
    ``"compute"`` (SaturatingFit); ``reference`` is a published ``StudyData`` to overlay and
    ``reference_fit`` its saturating fit (drawn on the compute plot). The extras, each drawn
    only when given: ``grids`` (trial -> PNG, from ``analysis.gallery.last_sample_grids``) as
    ``gallery``; ``residuals`` (a fit's ``used`` frame) as ``residuals``; ``backtest``
    (leave-one-out frame, held-out dict or None) as ``backtest``; ``frontier_law`` (optimal
    frame, isoFLOP minima or None) as ``frontier_law``.
    """
    out = Path(out_dir)
    result = PlotSet()
    _fid_plots(data, out, fits or {}, reference, reference_fit, result)
    if has(data.losses, LOSS):
        result.paths["loss_curves"] = plot_loss_curves(data.losses, out / "loss_curves",
                                                       title=f"{data.name}: training loss")
        result.paths["loss_vs_gflops"] = plot_loss_vs_gflops(data.trials, out / "loss_vs_gflops")
    elif data.source != "published":
        result.notes.append("no training loss logged yet")
    _law_plots(data, out, result, backtest=backtest, frontier_law=frontier_law, residuals=residuals, grids=grids)
    result.paths = {k: v for k, v in result.paths.items() if v}
    return result
