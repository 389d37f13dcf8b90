"""A study's report: spec summary, cell table, fitted laws with intervals, plots, FID protocol.

``build_report`` writes ``report.html`` (self-contained: plots embedded as base64 PNG) or
``report.md`` (plots beside it under ``plots/``) into a folder; ``log_report`` sends the
written files to the study's parent MLflow run under ``report/``; ``write_study_report`` is
what ``ditscale run`` calls at the end (``<study folder>/report/report.html``). The report is
written atomically (a reader, or a crash, never finds it half-written) and shows the tracking
URI without its password. With a tracking server it is logged to the server's artifact store.
"""

from __future__ import annotations

import base64
import html
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import store
from analysis.analyze import Analysis, analyze
from analysis.gallery import last_sample_grids
from analysis.runs import StudyData
from analysis.schema import REPORT_ARTIFACT_DIR, REPORT_DIR
from analysis.tables import (backtest_table, cell_table, frontier_table, law_table, prediction_table,
                             recommendation_table)
from analysis.tables import fmt as display_value
from dit.files import atomic_write_text

ARTIFACT_DIR = REPORT_ARTIFACT_DIR


@dataclass
class Report:
    path: Path  # report.html or report.md
    files: list[Path]  # everything written (the report and its plots)
    analyses: list[Analysis]
    notes: list[str]
    logged_run_id: str | None = None


def _spec_summary(data: StudyData) -> list[tuple[str, str]]:
    t = data.trials
    items: list[tuple[str, str]] = [("study", data.name)]
    if data.source == "published":
        items.append(("source", "published table"))
    else:
        items += [("tracking store", store.redact_uri(str(data.tracking_uri))), ("parent run", str(data.parent_run_id)),
                  ("study run status", str(data.parent_status).lower())]
    items.append(("cells", str(len(t))))
    if len(t):
        status = t["status"].astype(str).str.lower().value_counts()
        items.append(("status", ", ".join(f"{n} {s}" for s, n in status.items())))
        for col, label in (("model", "models"), ("image_size", "image size"), ("steps", "steps"),
                           ("global_batch", "global batch"), ("lr", "learning rate"), ("block", "block"),
                           ("precision", "precision"), ("zero_stage", "ZeRO stage")):
            values = [v for v in pd.unique(t[col]) if v is not None and not pd.isna(v)] if col in t else []
            if values:
                items.append((label, ", ".join(display_value(v) if not isinstance(v, float) else f"{v:g}"
                                               for v in values)))
    return items


def _spec_json(data: StudyData) -> str | None:
    if not data.spec:
        return None
    # Specs logged before ditscale redacted them may still hold a password in a URI.
    return json.dumps(store.redact_json(data.spec), indent=2, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.82em}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.4em .8em;margin:.6em 0}
.meta{color:#666;font-size:.9em}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:600}dd{margin:0}
"""

PLOT_CAPTIONS = {
    "fid_vs_gflops": "FID against model Gflops at one training step, with the log-log power-law fit and "
                     "its bootstrap band.",
    "fid_vs_compute": "FID against training compute (Gflops counted as multiply-adds: FLOPs are twice "
                      "this), one curve per model; the step line is the observed compute-efficient "
                      "frontier; dashed: the saturating law fitted to that frontier.",
    "gallery": "Each cell's samples at its last evaluation, model size down the rows (smallest first) and "
               "patch size across (largest first), with its final FID.",
    "residuals": "Residuals of the FID-vs-Gflops law (ln observed - ln fitted), coloured by patch size: "
                 "a pattern by patch means Gflops alone do not explain FID.",
    "backtest": "Backtests: each model predicted by the law fitted to the other models (bars: 95% "
                "prediction intervals); the largest model held out is highlighted.",
    "frontier_law": "The compute-optimal frontier of the envelope law FID = E + A N^-a + B D^-b with its "
                    "band, over every evaluation; right: the optimal model size per budget, with the "
                    "isoFLOP minima as a cross-check.",
    "fid_vs_step": "FID over training: panels hold patch size fixed (curves: model sizes), then model size "
                   "fixed (curves: patch sizes).",
    "loss_curves": "Training loss per trial against step and training compute, log axes (faint: raw; solid: "
                   "binned median).",
    "loss_vs_gflops": "Final training loss (mean of the last tenth of the logged steps) against model Gflops.",
}


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False, name=None))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(df: pd.DataFrame) -> str:
    if not len(df.columns):
        return ""
    esc = lambda v: str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines)


def _table_blocks(title: str, table: pd.DataFrame, note: str | None = None) -> list[tuple[str, Any]]:
    if not len(table):
        return []
    return [("h3", title)] + ([("p", note)] if note else []) + [("table", table)]


def _fit_or_reason(fit: Any, errors: dict[str, str], key: str, what: str) -> list[tuple[str, Any]]:
    """The fit's summary, else why it is missing (a reason already said for FID vs Gflops is not repeated)."""
    if fit is not None:
        return [("pre", fit.summary())]
    if key not in errors or (key != "gflops" and errors[key] == errors.get("gflops")):
        return []
    return [("note", f"{what}: {errors[key]}")]


def _backtest_blocks(a: Analysis) -> list[tuple[str, Any]]:
    if a.loo is None:
        return [("note", f"Backtests: {a.errors['backtest']}")] if "backtest" in a.errors else []
    h = a.holdout or {}
    note = (f"Each model predicted by the FID-vs-Gflops law fitted to the other models. Leave-one-out RMSE "
            f"of ln FID: {a.loo.rmse_log:.3f}.")
    if h:
        lo, hi = h["interval"]
        note += (f" Largest model {h['model']} held out: predicted {h['predicted']:.2f} [{lo:.2f}, {hi:.2f}], "
                 f"actual {h['actual']:.2f} ({'inside' if h['covered'] else 'outside'} the interval).")
    return _table_blocks("Backtests (data the law was not fitted to)", backtest_table(a), note)


def _frontier_blocks(a: Analysis) -> list[tuple[str, Any]]:
    blocks: list[tuple[str, Any]] = []
    if a.envelope is not None:
        blocks += [("h3", "Compute-optimal frontier (whole training curves)"), ("pre", a.envelope.summary())]
        if a.isoflop is not None:
            blocks.append(("pre", a.isoflop.summary()))
        elif "isoflop" in a.errors:
            blocks.append(("note", f"isoFLOP cross-check: {a.errors['isoflop']}"))
        blocks += _table_blocks("What a budget should train", recommendation_table(a),
                                "The study's model with the lowest FID the envelope law predicts at each budget.")
    elif "envelope" in a.errors:
        blocks.append(("note", f"Compute-optimal frontier: {a.errors['envelope']}"))
    return blocks


def _sections(a: Analysis) -> list[tuple[str, Any]]:
    """(kind, payload) blocks for one data set's fits; rendered by both writers."""
    blocks: list[tuple[str, Any]] = []
    laws = law_table(a)
    if len(laws):
        blocks.append(("table", laws))
    blocks += _fit_or_reason(a.gflops, a.errors, "gflops", "FID vs Gflops")
    blocks += _backtest_blocks(a)
    blocks += _fit_or_reason(a.compute, a.errors, "compute", "FID vs training compute")
    blocks += _table_blocks("Extrapolated compute budgets", prediction_table(a))
    blocks += _frontier_blocks(a)
    blocks += _table_blocks("Compute-efficient frontier (observed)", frontier_table(a))
    if a.losses is not None:
        blocks += [("h3", "Loss laws"), ("pre", a.losses.summary())]
    return blocks


def _law_plot_inputs(a: Analysis) -> dict[str, Any]:
    """The extra frames plot_study draws for the laws that were fitted."""
    extras: dict[str, Any] = {}
    if a.loo is not None:
        extras["backtest"] = (a.loo.rows, a.holdout)
    if a.optimal is not None:
        extras["frontier_law"] = (a.optimal, a.isoflop.minima if a.isoflop is not None else None)
    if a.gflops is not None:
        cells = a.data.evals[["model", "patch_size", "size"]].drop_duplicates("model")
        extras["residuals"] = a.gflops.used.merge(cells, left_on="label", right_on="model", how="left")
    return extras


def build_report(
    data: StudyData,
    out_dir: str | Path,
    *,
    fmt: str = "html",
    published: StudyData | None = None,
    step: int | None = None,
    n_boot: int = 2000,
    n_boot_saturating: int = 1000,
    seed: int = 0,
) -> Report:
    """Fit, plot and write the report of ``data`` (a study, or a published table alone);
    ``published`` adds a published table beside the study (its fits and its points)."""
    from analysis.plots import plot_study

    if fmt not in ("html", "md"):
        raise ValueError("fmt must be 'html' or 'md'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = analyze(data, step=step, n_boot=n_boot, n_boot_saturating=n_boot_saturating, seed=seed)
    analyses = [main]
    ref = None
    if published is not None and published is not data:
        ref = analyze(published, n_boot=n_boot, n_boot_saturating=n_boot_saturating, seed=seed)
        analyses.append(ref)
    with tempfile.TemporaryDirectory(prefix="ditscale-grids-") as grid_dir:
        notes_extra: list[str] = []
        grids = last_sample_grids(data, grid_dir, notes=notes_extra)
        plots = plot_study(data, out / "plots", fits=main.fits(), reference=published if ref else None,
                           reference_fit=ref.compute if ref else None, grids=grids, **_law_plot_inputs(main))
    plots.notes.extend(notes_extra)
    if ref is not None:
        ref_plots = plot_study(published, out / "plots" / "published", fits=ref.fits())
    else:
        ref_plots = None
    notes = list(dict.fromkeys(data.notes + plots.notes))
    if fmt == "html":
        text = _render_html(data, analyses, plots, ref_plots, notes)
        path = out / "report.html"
    else:
        text = _render_md(data, analyses, plots, ref_plots, notes, out)
        path = out / "report.md"
    # Atomic: a failed write (disk full) keeps the previous report whole instead of truncating it.
    atomic_write_text(path, text)
    files = [path] + [p for ps in (plots, ref_plots) if ps for paths in ps.paths.values() for p in paths]
    return Report(path=path, files=files, analyses=analyses, notes=notes)


def _title(data: StudyData) -> str:
    return f"ditscale report: {data.name}"


def _plot_items(plots, prefix: str = "") -> list[tuple[str, Path, str]]:
    items = []
    for name, paths in plots.paths.items():
        for p in paths:
            if p.suffix == ".png":
                items.append((name, p, prefix + PLOT_CAPTIONS.get(name, name)))
    return items


def _render_html(data, analyses, plots, ref_plots, notes) -> str:
    esc = html.escape
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(_title(data))}</title>"
             f"<style>{CSS}</style></head><body>"),
             f"<h1>{esc(_title(data))}</h1>",
             f"<p class='meta'>generated {time.strftime('%Y-%m-%d %H:%M:%S')} by ditscale</p>"]
    for n in notes:
        parts.append(f"<div class='note'>{esc(n)}</div>")
    parts.append("<h2>Study</h2><dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>"
                                                for k, v in _spec_summary(data)) + "</dl>")
    spec = _spec_json(data)
    if spec:
        parts.append(f"<details><summary>resolved spec</summary><pre>{esc(spec)}</pre></details>")
    parts.append(f"<h2>FID protocol</h2><p>{esc(data.protocol or 'not recorded')}</p>")
    parts.append("<h2>Cells</h2>" + _html_table(cell_table(data)))
    for a in analyses:
        heading = "Fitted laws" if a.data is data else f"Published: {a.data.name}"
        parts.append(f"<h2>{esc(heading)}</h2>")
        if a.data is not data:
            parts.append(f"<p>FID protocol: {esc(a.data.protocol)}</p>" + _html_table(cell_table(a.data)))
        parts += [_html_block(kind, payload) for kind, payload in _sections(a)]
    parts.append("<h2>Plots</h2>")
    items = _plot_items(plots) + (_plot_items(ref_plots, "Published table: ") if ref_plots else [])
    if not items:
        parts.append("<p>nothing to plot yet</p>")
    for name, path, caption in items:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure id='{esc(name)}'><img alt='{esc(name)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{esc(caption)} (SVG: {esc(path.with_suffix('.svg').name)})</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_block(kind: str, payload: Any) -> str:
    if kind == "table":
        return _html_table(payload)
    if kind == "pre":
        return f"<pre>{html.escape(payload)}</pre>"
    if kind == "h3":
        return f"<h3>{html.escape(payload)}</h3>"
    if kind == "p":
        return f"<p>{html.escape(payload)}</p>"
    return f"<div class='note'>{html.escape(payload)}</div>"


def _render_md(data, analyses, plots, ref_plots, notes, out: Path) -> str:
    parts = [f"# {_title(data)}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M:%S')} by ditscale_", ""]
    parts += [f"> **Note:** {n}\n" for n in notes]
    parts += ["## Study", ""] + [f"- **{k}**: {v}" for k, v in _spec_summary(data)] + [""]
    spec = _spec_json(data)
    if spec:
        parts += ["<details><summary>resolved spec</summary>", "", "```json", spec, "```", "", "</details>", ""]
    parts += ["## FID protocol", "", data.protocol or "not recorded", "", "## Cells", "",
              _md_table(cell_table(data)), ""]
    for a in analyses:
        parts += [f"## {'Fitted laws' if a.data is data else 'Published: ' + a.data.name}", ""]
        if a.data is not data:
            parts += [f"FID protocol: {a.data.protocol}", "", _md_table(cell_table(a.data)), ""]
        for kind, payload in _sections(a):
            if kind == "table":
                parts += [_md_table(payload), ""]
            elif kind == "pre":
                parts += ["```", payload, "```", ""]
            elif kind == "h3":
                parts += [f"### {payload}", ""]
            elif kind == "p":
                parts += [payload, ""]
            else:
                parts += [f"> **Note:** {payload}", ""]
    parts += ["## Plots", ""]
    items = _plot_items(plots) + (_plot_items(ref_plots, "Published table: ") if ref_plots else [])
    if not items:
        parts += ["nothing to plot yet", ""]
    for name, path, caption in items:
        rel = path.relative_to(out).as_posix()
        parts += [f"![{name}]({rel})", "", f"_{caption}_ ([SVG]({Path(rel).with_suffix('.svg').as_posix()}))", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------
# MLflow and the `ditscale run` hook
# ------------------------------------------------------------------------------------------


def log_report(report: Report, data: StudyData, artifact_dir: str = ARTIFACT_DIR) -> str:
    """Log the report's files to the study's parent run under ``report/``; returns the run id."""
    if not data.parent_run_id or not data.tracking_uri:
        raise ValueError("the report's data come from no MLflow study: nothing to log to")
    client = store.client(data.tracking_uri)
    root = report.path.parent
    for path in report.files:
        rel = path.parent.relative_to(root).as_posix()
        target = artifact_dir if rel in ("", ".") else f"{artifact_dir}/{rel}"
        client.log_artifact(data.parent_run_id, str(path), target)
    report.logged_run_id = data.parent_run_id
    return data.parent_run_id


def write_study_report(result, *, fmt: str = "html", log: bool = True, n_boot: int = 2000,
                       n_boot_saturating: int = 1000) -> Path:
    """The report of a study that ``ditscale run`` just ran: ``<root>/report/report.html``,
    logged to the parent run under ``report/``. ``result`` needs ``name``, ``root``,
    ``tracking_uri`` and ``parent_run_id``."""
    from analysis.runs import load_study

    data = load_study(result.parent_run_id or result.name, result.tracking_uri)
    report = build_report(data, Path(result.root) / REPORT_DIR, fmt=fmt, n_boot=n_boot,
                          n_boot_saturating=n_boot_saturating)
    if log:
        try:
            log_report(report, data)
        except Exception as err:  # noqa: BLE001 -- the study's results matter more than the upload
            print(f"warning: the report was written to {report.path} but could not be logged to MLflow "
                  f"({type(err).__name__}: {store.redact_uri(str(err))})", file=sys.stderr)
    return report.path
