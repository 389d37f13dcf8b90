"""Plots of fitted laws and how far to trust them: residuals, leave-one-out backtests, and the
compute-optimal law with its isoFLOP minima.

Each function takes plain frames and dicts (what a fit's ``used`` frame or a backtest's table
holds), not the fit classes, so these plots do not change when a fit's internals do. As in
``analysis.plots``, ``plot_*`` saves ``<stem>.png`` and ``<stem>.svg`` and returns their
paths (``[]`` when there is nothing to draw), and its ``*_figure`` twin builds the figure
unsaved (None when there is nothing to draw).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.plot_style import (
    PATCH_COLORS,
    PATCH_LINES,
    REFERENCE_COLOR,
    figure,
    has,
    label_points,
    legend_outside,
    model_order,
    ordered_sizes,
    patch_of,
    patches,
    plain_log_ticks,
    save,
    size_color,
    size_label,
    size_patch_handles,
    style_of,
    unit_log_ticks,
    with_style,
)
from analysis.schema import FID
from analysis.units import COMPUTE_LABEL, FORWARD_LABEL, PARAMS_LABEL, format_params

__all__ = ["backtest_figure", "frontier_law_figure", "plot_backtest", "plot_frontier_law", "plot_residuals",
           "residuals_figure"]

# Marker by size where colour is taken by the patch (residual panels), smallest size first.
SIZE_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_FALLBACK_PATCH_COLORS = ["#8C564B", "#E377C2", "#17BECF", "#BCBD22"]


def _saved(fig: Any, stem: str | Path) -> list[Path]:
    return [] if fig is None else with_style(save)(fig, stem)


def _x_axis(ax, x: str, xlabel: str | None) -> None:
    """Units on a log x axis that holds Gflops (forward or training compute) or a count."""
    if x in ("x", "gflops"):
        unit_log_ticks(ax, "x", "flops")
        ax.set_xlabel(xlabel or FORWARD_LABEL)
    elif x in ("compute", "compute_gflops"):
        unit_log_ticks(ax, "x", "flops")
        ax.set_xlabel(xlabel or COMPUTE_LABEL)
    elif x in ("params", "n", "n_opt"):
        unit_log_ticks(ax, "x", "params")
        ax.set_xlabel(xlabel or PARAMS_LABEL)
    else:
        ax.set_xlabel(xlabel or x)


def _residual_handles(order: list[int], sizes: list[str], outliers: bool) -> list[Any]:
    """Legend entries of the residual panel: colour = patch, marker = size, hollow = outlier."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_patch_color(p, order), marker="o", linestyle="none", label=f"patch {p}")
               for p in order]
    handles += [Line2D([], [], color="#555555", marker=SIZE_MARKERS[i % len(SIZE_MARKERS)], linestyle="none",
                       label=size_label(s)) for i, s in enumerate(sizes)]
    if outliers:
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="none", linestyle="none",
                              label="outlier (down-weighted)"))
    return handles


def _patch_color(patch: int | None, order: list[int]) -> str:
    if patch in PATCH_COLORS:
        return PATCH_COLORS[patch]
    extra = [p for p in order if p not in PATCH_COLORS]
    return _FALLBACK_PATCH_COLORS[extra.index(patch) % len(_FALLBACK_PATCH_COLORS)] if patch in extra else "#444444"


# ------------------------------------------------------------------------------------------
# Residuals
# ------------------------------------------------------------------------------------------


@with_style
def residuals_figure(used: pd.DataFrame, *, x: str = "x", residual: str = "residual", patch: str = "patch_size",
                     size: str = "size", title: str | None = None, xlabel: str | None = None) -> Any:
    """The figure of :func:`plot_residuals`, unsaved; None when ``used`` has no residuals."""
    if not has(used, residual) or not has(used, x):
        return None
    rows = used[(pd.to_numeric(used[x], errors="coerce") > 0) & used[residual].notna()].copy()
    if not len(rows):
        return None
    rows["_patch"] = rows[patch].map(lambda p: None if pd.isna(p) else int(p)) if patch in rows else None
    order = sorted(p for p in rows["_patch"].dropna().unique())
    fig, axes = figure(5.6, 3.4)
    ax = axes[0, 0]
    res = rows[residual].to_numpy(float)
    sd = float(np.std(res, ddof=1)) if len(res) > 1 else float("nan")
    if math.isfinite(sd):
        ax.axhspan(-sd, sd, color="#999999", alpha=0.12, lw=0, label=f"±1 sd of the residuals ({sd:.3f})")
    ax.axhline(0.0, color="#222222", lw=0.9, label="the fit (residual 0)")
    outlier = rows["outlier"].fillna(False).astype(bool) if "outlier" in rows else pd.Series(False, rows.index)
    sizes = ordered_sizes(rows.rename(columns={size: "size"})) if size in rows else []
    for i in range(len(rows)):
        p = rows["_patch"].iloc[i]
        p = None if p is None or pd.isna(p) else int(p)
        s_name = str(rows[size].iloc[i]) if size in rows else None
        marker = SIZE_MARKERS[sizes.index(s_name) % len(SIZE_MARKERS)] if s_name in sizes else "o"
        color = _patch_color(p, order)
        ax.scatter([rows[x].iloc[i]], [res[i]], s=32, zorder=3, marker=marker, linewidths=1.1, edgecolors=color,
                   facecolors="none" if outlier.iloc[i] else color)
    legend_outside(ax, ax.get_legend_handles_labels()[0] + _residual_handles(order, sizes, bool(outlier.any())))
    ax.set_xscale("log")
    _x_axis(ax, x, xlabel)
    lim = max(float(np.nanmax(np.abs(res))) * 1.25, 1e-3)
    ax.set_ylim(-lim, lim)  # symmetric: a reader judges the sign of a miss by the zero line's place
    ax.set_ylabel("residual: ln observed − ln fitted")
    ax.set_title(title or "Residuals of the fit")
    if "label" in rows and len(rows) <= 14:
        label_points(ax, rows[x].to_numpy(float), res, rows["label"].astype(str).tolist())
    return fig


def plot_residuals(used: pd.DataFrame, stem: str | Path, *, x: str = "x", residual: str = "residual",
                   patch: str = "patch_size", size: str = "size", title: str | None = None,
                   xlabel: str | None = None) -> list[Path]:
    """Residuals of a fit (ln observed − ln fitted) against ``x`` on a log axis, coloured by
    patch size (marker: model size), with the zero line and a ±1 sd band; rows with ``outlier``
    true are hollow.
    ``used`` is a fit's ``used`` frame with ``patch_size`` merged in (``plot_study`` does it)."""
    return _saved(residuals_figure(used, x=x, residual=residual, patch=patch, size=size, title=title,
                                   xlabel=xlabel), stem)


# ------------------------------------------------------------------------------------------
# Leave-one-out backtest
# ------------------------------------------------------------------------------------------


def _rmse_of(loo: pd.DataFrame) -> float | None:
    value = loo.attrs.get("rmse_log")
    if value is None and "rmse_log" in loo and loo["rmse_log"].notna().any():
        value = loo["rmse_log"].dropna().iloc[0]
    try:
        return float(value) if value is not None and math.isfinite(float(value)) else None
    except (TypeError, ValueError):
        return None


def _holdout_text(h: dict) -> str:
    """The held-out model's miss in words: predicted, its interval, observed, how far off."""
    pred, actual = h.get("predicted"), h.get("actual")
    lo, hi = (list(h.get("interval") or []) + [None, None])[:2]
    text = f"held out: {h.get('model', '?')}\npredicted {pred:.3g}" if pred is not None else "held out"
    if lo is not None and hi is not None:
        text += f" [{lo:.3g}, {hi:.3g}]"
    if actual is None or pd.isna(actual):
        return text + "\nnot observed yet"
    miss = pred / actual - 1.0
    text += f"\nobserved {actual:.3g}: predicted {abs(miss):.0%} {'high' if miss > 0 else 'low'}"
    if lo is not None and hi is not None:
        text += ", inside the interval" if lo <= actual <= hi else ", OUTSIDE the interval"
    return text


@with_style
def backtest_figure(loo: pd.DataFrame, *, holdout: dict | None = None, quantity: str = "FID",
                    title: str | None = None) -> Any:
    """The figure of :func:`plot_backtest`, unsaved; None when there is nothing to compare."""
    pts = loo.dropna(subset=["actual", "predicted"]) if {"actual", "predicted"} <= set(loo) else loo.iloc[0:0]
    pts = pts[(pts["actual"] > 0) & (pts["predicted"] > 0)]
    if not len(pts) and not holdout:
        return None
    fig, axes = figure(5.6, 4.0)
    ax = axes[0, 0]
    sizes = ordered_sizes(pts)
    colors = [size_color(str(s), sizes) for s in pts["size"]] if "size" in pts else ["#333333"] * len(pts)
    if {"lo", "hi"} <= set(pts):
        err = np.vstack([pts["predicted"] - pts["lo"], pts["hi"] - pts["predicted"]]).clip(min=0)
        ax.errorbar(pts["actual"], pts["predicted"], yerr=np.nan_to_num(err), fmt="none", ecolor="#999999",
                    elinewidth=0.9, capsize=2, zorder=2, label="prediction interval")
    ax.scatter(pts["actual"], pts["predicted"], c=colors, s=30, zorder=3, edgecolors="white", linewidths=0.5)
    if len(pts):  # a grey legend marker: the points' colours are the sizes', listed below
        ax.plot([], [], "o", color="#555555", label="left out in turn, predicted from the rest")
    values = list(pts["actual"]) + list(pts["predicted"]) + list(pts.get("lo", [])) + list(pts.get("hi", []))
    if holdout and holdout.get("predicted") is not None:
        lo, hi = (list(holdout.get("interval") or []) + [None, None])[:2]
        values += [v for v in (holdout["predicted"], holdout.get("actual"), lo, hi) if v is not None]
        actual = holdout.get("actual")
        if actual is not None and not pd.isna(actual):
            yerr = None if lo is None else [[max(holdout["predicted"] - lo, 0)], [max(hi - holdout["predicted"], 0)]]
            ax.errorbar([actual], [holdout["predicted"]], yerr=yerr, fmt="*", color="#D62728", markersize=12,
                        capsize=3, zorder=4, label=_holdout_text(holdout))
        else:  # nothing observed to put it against: its prediction as a level, so it still shows
            ax.axhline(holdout["predicted"], color="#D62728", lw=1.0, linestyle="--", label=_holdout_text(holdout))
    values = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    lo_v, hi_v = min(values) / 1.15, max(values) * 1.15
    ax.plot([lo_v, hi_v], [lo_v, hi_v], color="#222222", lw=0.9, linestyle=(0, (4, 2)), label="predicted = observed")
    ax.set_xlim(lo_v, hi_v)
    ax.set_ylim(lo_v, hi_v)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "x")
    plain_log_ticks(ax, "y")
    ax.set_xlabel(f"observed {quantity}")
    ax.set_ylabel(f"predicted {quantity} (point left out of the fit)")
    ax.set_title(title or _backtest_title(pts, _rmse_of(loo)))
    handles, _ = ax.get_legend_handles_labels()
    legend_outside(ax, handles + (size_patch_handles(sizes, []) if "size" in pts else []))
    if "label" in pts and len(pts) <= 14:
        label_points(ax, pts["actual"].to_numpy(float), pts["predicted"].to_numpy(float),
                     pts["label"].astype(str).tolist())
    return fig


def _backtest_title(pts: pd.DataFrame, rmse: float | None) -> str:
    parts = ["Leave-one-out backtest"]
    if rmse is not None:
        parts.append(f"RMSE(ln) = {rmse:.3f}")
    if {"lo", "hi"} <= set(pts) and len(pts):
        inside = int(((pts["lo"] <= pts["actual"]) & (pts["actual"] <= pts["hi"])).sum())
        parts.append(f"{inside}/{len(pts)} inside their interval")
    return ": ".join(parts[:1]) + (" (" + "; ".join(parts[1:]) + ")" if len(parts) > 1 else "")


def plot_backtest(loo: pd.DataFrame, stem: str | Path, *, holdout: dict | None = None, quantity: str = "FID",
                  title: str | None = None) -> list[Path]:
    """Observed against predicted (log-log) from a leave-one-out frame (label, actual,
    predicted, lo, hi; optional size), error bars = the prediction interval, the line
    predicted = observed, and ``holdout`` (model, predicted, interval [lo, hi], actual: the
    largest model, predicted from the others) as a red star whose miss the legend spells out.
    The title carries RMSE(ln) from ``loo.attrs['rmse_log']`` or a ``rmse_log`` column."""
    return _saved(backtest_figure(loo, holdout=holdout, quantity=quantity, title=title), stem)


# ------------------------------------------------------------------------------------------
# The compute-optimal law
# ------------------------------------------------------------------------------------------


def _evals_panel(ax, evals: pd.DataFrame, sizes: list[str]) -> None:
    """Every evaluation as a thin line per trial, coloured by size."""
    pts = evals.dropna(subset=[FID, "compute_gflops"])
    for trial in model_order(pts, sizes):
        g = pts[pts["trial"] == trial].sort_values("compute_gflops")
        st = style_of(g.iloc[0], sizes)
        ax.plot(g["compute_gflops"], g[FID], color=st["color"], linestyle=PATCH_LINES.get(patch_of(g.iloc[0]), "-"),
                marker=st["marker"], markersize=2.6, lw=0.8, alpha=0.75)


def _law_panel(ax, optimal: pd.DataFrame, minima: pd.DataFrame | None, reference: Any) -> None:
    opt = optimal.dropna(subset=["compute_gflops", "fid"]).sort_values("compute_gflops")
    if {"lo", "hi"} <= set(opt) and opt["lo"].notna().any():
        ax.fill_between(opt["compute_gflops"], opt["lo"], opt["hi"], color="#222222", alpha=0.12, lw=0,
                        label="band of the law")
    ax.plot(opt["compute_gflops"], opt["fid"], color="#222222", lw=1.6, label="compute-optimal law")
    if minima is not None and has(minima, "fid_opt"):
        ax.scatter(minima["compute_gflops"], minima["fid_opt"], marker="D", s=30, color="#D62728", zorder=4,
                   edgecolors="white", linewidths=0.5, label="isoFLOP minima")
    ref = getattr(reference, "evals", reference)
    if has(ref, FID):
        ax.scatter(ref["compute_gflops"], ref[FID], s=26, facecolors="none", edgecolors=REFERENCE_COLOR,
                   linewidths=1.0, zorder=2, label=getattr(reference, "name", None) or "published")


def _n_opt_panel(ax, optimal: pd.DataFrame, minima: pd.DataFrame | None) -> None:
    """N_opt against compute: the isoFLOP minima and the law's N_opt(C)."""
    if has(optimal, "n_opt"):
        opt = optimal.dropna(subset=["compute_gflops", "n_opt"]).sort_values("compute_gflops")
        ax.plot(opt["compute_gflops"], opt["n_opt"], color="#222222", lw=1.6, label="law: N_opt(C)")
    if minima is not None and has(minima, "n_opt"):
        m = minima.dropna(subset=["compute_gflops", "n_opt"])
        ax.scatter(m["compute_gflops"], m["n_opt"], marker="D", s=30, color="#D62728", zorder=4,
                   edgecolors="white", linewidths=0.5, label="isoFLOP minima")
        if len(m) <= 10:
            label_points(ax, m["compute_gflops"].to_numpy(float), m["n_opt"].to_numpy(float),
                         [format_params(v) for v in m["n_opt"]])
    ax.set_xscale("log")
    ax.set_yscale("log")
    unit_log_ticks(ax, "x", "flops")
    unit_log_ticks(ax, "y", "params")
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel("compute-optimal parameters N_opt")
    ax.set_title("Compute-optimal model size")
    legend_outside(ax)


@with_style
def frontier_law_figure(evals: pd.DataFrame, optimal: pd.DataFrame, *, minima: pd.DataFrame | None = None,
                        reference: Any = None, title: str | None = None) -> Any:
    """The figure of :func:`plot_frontier_law`, unsaved; None without a law to draw."""
    if optimal is None or not has(optimal, "fid") or not has(optimal, "compute_gflops"):
        return None
    second = has(optimal, "n_opt") or (minima is not None and has(minima, "n_opt"))
    fig, axes = figure(10.4 if second else 6.2, 3.9, ncols=2 if second else 1)
    ax = axes[0, 0]
    sizes = ordered_sizes(evals) if evals is not None else []
    if has(evals, FID):
        _evals_panel(ax, evals, sizes)
    _law_panel(ax, optimal, minima, reference)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax, "y")
    unit_log_ticks(ax, "x", "flops")
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel("FID")
    ax.set_title(title or "FID vs compute: every evaluation and the compute-optimal law")
    handles, _ = ax.get_legend_handles_labels()
    legend_outside(ax, handles + size_patch_handles(sizes, patches(evals) if evals is not None else []))
    if second:
        _n_opt_panel(axes[0, 1], optimal, minima)
    return fig


def plot_frontier_law(evals: pd.DataFrame, optimal: pd.DataFrame, stem: str | Path, *,
                      minima: pd.DataFrame | None = None, reference: Any = None,
                      title: str | None = None) -> list[Path]:
    """Every evaluation as FID against compute (thin lines per trial, coloured by size), the
    fitted compute-optimal law ``optimal`` (compute_gflops, n_opt, d_opt, fid, lo, hi) with its
    band, and the isoFLOP ``minima`` (compute_gflops, n_opt, fid_opt) as red diamonds; a second
    panel shows N_opt against compute (law and minima) on log-log. ``reference`` (a published
    ``StudyData`` or its evals) adds its points in grey."""
    return _saved(frontier_law_figure(evals, optimal, minima=minima, reference=reference, title=title), stem)
