"""The sample gallery: each cell's last sample grid, laid out model size × patch size.

Like the paper's figure of samples across model sizes: one row per size (smallest at the top),
one column per patch size (largest first, so compute grows to the right and downwards). The
grids come from the trials' MLflow runs, where ``orchestrator.tracking.SampleGridSink`` logs
each evaluation's grid under ``samples/`` as ``samples_step<NNNNNNNN>.png``
(``dit.evaluate.grids.sample_grid_path``); :func:`last_sample_grids` downloads the latest.
Each cell names its model, size in parameters and flops, its final FID and the step its
samples were drawn at, so a grid from mid-training is never read as a final one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import store
from analysis.plot_style import figure, ordered_sizes, save, size_label, with_style
from analysis.schema import SAMPLES_ARTIFACT_DIR
from analysis.units import format_flops, format_params

__all__ = ["gallery_figure", "gallery_layout", "grid_step", "last_sample_grids", "plot_sample_gallery"]

# The longest side a cell's image keeps: a paper-scale grid (8 × 8 of 256 px) would make the
# SVG tens of megabytes, and a cell is about 2.4 in wide at 200 dpi anyway.
MAX_CELL_PX = 640
_STEP = re.compile(r"step0*(\d+)")
_DIGITS = re.compile(r"(\d+)")


def grid_step(path: str | Path) -> int | None:
    """The training step in a sample grid's file name ('samples_step00001300.png' -> 1300)."""
    name = Path(str(path)).name
    m = _STEP.search(name) or _DIGITS.search(name)
    return int(m.group(1)) if m else None


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) or "trial"


def last_sample_grids(data: Any, dest_dir: str | Path, *, notes: list[str] | None = None) -> dict[str, Path]:
    """trial -> local PNG of its last evaluation's sample grid, downloaded into
    ``dest_dir/<trial>/`` from the trial run's ``samples/`` artifacts (the highest step wins).

    Trials without a run or without grids are left out; so is a trial whose download fails,
    with a line in ``notes`` when given (a report still renders without its gallery)."""
    trials = getattr(data, "trials", None)
    uri = getattr(data, "tracking_uri", None)
    if not uri or trials is None or "run_id" not in trials or not len(trials):
        return {}
    client = store.client(uri)
    out: dict[str, Path] = {}
    for _, row in trials.dropna(subset=["run_id"]).iterrows():
        trial, run_id = str(row["trial"]), str(row["run_id"])
        try:
            pngs = [a.path for a in client.list_artifacts(run_id, SAMPLES_ARTIFACT_DIR)
                    if not a.is_dir and a.path.lower().endswith(".png")]
            if not pngs:
                continue
            last = max(pngs, key=lambda p: (grid_step(p) is not None, grid_step(p) or 0, p))
            target = Path(dest_dir) / _safe(trial)
            target.mkdir(parents=True, exist_ok=True)
            out[trial] = Path(client.download_artifacts(run_id, last, str(target)))
        except Exception as err:  # noqa: BLE001 -- one unreadable run must not cost the whole report
            if notes is not None:
                notes.append(f"{trial}: its sample grids could not be downloaded ({type(err).__name__}: "
                             f"{store.redact_uri(str(err))[:200]})")
    return out


def gallery_layout(trials: pd.DataFrame, grids: dict[str, Path]) -> tuple[list[str], list[int], dict]:
    """(sizes smallest first, patches largest first, {(size, patch): trial row}) over every trial,
    so a cell without samples shows as a gap rather than vanishing; where two trials share a
    cell, the one with a grid wins."""
    if not len(trials) or "size" not in trials or "patch_size" not in trials:
        return [], [], {}
    rows = trials[trials["size"].notna() & pd.to_numeric(trials["patch_size"], errors="coerce").notna()]
    sizes = ordered_sizes(rows)
    patch_sizes = sorted({int(p) for p in pd.to_numeric(rows["patch_size"])}, reverse=True)
    cells: dict[tuple[str, int], Any] = {}
    for _, row in rows.iterrows():
        key = (str(row["size"]), int(row["patch_size"]))
        if key not in cells or str(row["trial"]) in grids:
            cells[key] = row
    return sizes, patch_sizes, cells


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((MAX_CELL_PX, MAX_CELL_PX), Image.Resampling.LANCZOS)
        return np.asarray(img)


def _caption(row: Any, grid: Path | None) -> str:
    """Model, params, flops; final FID; the step the samples are from (when it differs)."""
    parts = [str(row.get("model") or row.get("trial"))]
    if not pd.isna(row.get("params", np.nan)):
        parts.append(f"{format_params(row['params'])} params")
    if not pd.isna(row.get("gflops", np.nan)):
        parts.append(format_flops(row["gflops"]))
    fid, fid_step = row.get("final_fid", np.nan), row.get("final_fid_step", np.nan)
    second = f"FID {fid:.3g}" if not pd.isna(fid) else "no FID"
    if not pd.isna(fid) and not pd.isna(fid_step):
        second += f" @ {int(fid_step):,}"
    step = grid_step(grid) if grid is not None else None
    if step is not None and (pd.isna(fid_step) or int(fid_step) != step):
        second += f"; samples @ {step:,}"
    return " · ".join(parts) + "\n" + second


def _blank(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#888888", fontsize=8, transform=ax.transAxes)


@with_style
def gallery_figure(trials: pd.DataFrame, grids: dict[str, Path], *, title: str | None = None) -> Any:
    """The figure of :func:`plot_sample_gallery`, unsaved; None when no trial has a grid.
    Axes are row-major: ``fig.axes[r * ncols + c]`` is size ``r``, patch ``c``."""
    grids = {str(k): Path(v) for k, v in (grids or {}).items() if v is not None and Path(v).is_file()}
    sizes, patch_sizes, cells = gallery_layout(trials, grids)
    if not cells or not any(str(r["trial"]) in grids for r in cells.values()):
        return None
    fig, axes = figure(2.5 * len(patch_sizes) + 0.4, 2.75 * len(sizes), ncols=len(patch_sizes), nrows=len(sizes))
    for r, size in enumerate(sizes):
        for c, patch in enumerate(patch_sizes):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
            row = cells.get((size, patch))
            grid = grids.get(str(row["trial"])) if row is not None else None
            if grid is not None:
                ax.imshow(_read_image(grid), interpolation="nearest")
            else:
                _blank(ax, "no samples")
            ax.set_xlabel(_caption(row, grid) if row is not None else "", fontsize=7)
            if c == 0:
                ax.set_ylabel(size_label(size), fontsize=10, fontweight="bold")
            if r == 0:
                ax.set_title(f"patch {patch}", fontsize=10, fontweight="bold")
    fig.suptitle(title or "Last sample grid of each cell (rows: model size; columns: patch size)", fontsize=10)
    return fig


def plot_sample_gallery(trials: pd.DataFrame, grids: dict[str, Path], stem: str | Path, *,
                        title: str | None = None) -> list[Path]:
    """Each trial's grid (``grids``: trial -> PNG, from :func:`last_sample_grids`) in a table of
    rows = sizes ordered by size and columns = patch sizes large to small; cells without
    samples are blank and say so. Returns ``[]`` when no trial has a grid."""
    fig = gallery_figure(trials, grids, title=title)
    return [] if fig is None else with_style(save)(fig, stem)
