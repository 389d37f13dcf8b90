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
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import store
from analysis.runs import StudyData
from analysis.schema import FID, REPORT_ARTIFACT_DIR, REPORT_DIR
from dit.files import atomic_write_text

ARTIFACT_DIR = REPORT_ARTIFACT_DIR


@dataclass
class Analysis:
    """Fits of one data set; ``errors`` says why a fit is missing."""

    data: StudyData
    gflops: Any = None  # PowerLawFit
    compute: Any = None  # SaturatingFit
    frontier: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def fits(self) -> dict[str, Any]:
        return {k: v for k, v in (("gflops", self.gflops), ("compute", self.compute)) if v is not None}


@dataclass
class Report:
    path: Path  # report.html or report.md
    files: list[Path]  # everything written (the report and its plots)
    analyses: list[Analysis]
    notes: list[str]
    logged_run_id: str | None = None


def analyze(data: StudyData, *, step: int | None = None, n_boot: int = 2000, n_boot_saturating: int = 1000,
            seed: int = 0) -> Analysis:
    """The fits the data allow; a fit that cannot run is recorded, never raised."""
    from analysis.fit import compute_frontier, fit_fid_vs_gflops, fit_saturating

    out = Analysis(data)
    if not data.has_fid:
        out.errors["gflops"] = out.errors["compute"] = "no FID yet"
        return out
    try:
        out.gflops = fit_fid_vs_gflops(data.evals, step, n_boot=n_boot, seed=seed)
    except (ValueError, np.linalg.LinAlgError) as err:
        out.errors["gflops"] = str(err)
    try:
        out.compute = fit_saturating(data.evals, n_boot=n_boot_saturating, seed=seed)
    except (ValueError, np.linalg.LinAlgError) as err:
        out.errors["compute"] = str(err)
    out.frontier = compute_frontier(data.evals)
    if out.compute is not None:
        top = float(out.compute.used["compute"].max())
        budgets = [top * k for k in (1, 10, 100)]
        conf = out.compute.predict(budgets)
        pred = out.compute.predict(budgets, kind="prediction")
        out.predictions = pd.DataFrame({
            "budget": ["largest in data", "10x", "100x"], "compute_gflops": budgets,
            "fid": conf.iloc[:, 1], "ci_lo": conf["lo"], "ci_hi": conf["hi"], "pi_lo": pred["lo"],
            "pi_hi": pred["hi"]})
    return out


# ------------------------------------------------------------------------------------------
# Tables and text
# ------------------------------------------------------------------------------------------


def _fmt(v: Any, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    if kind == "int":
        return f"{int(v):,}"
    if kind == "sci":
        return f"{float(v):.3g}"
    if kind == "params":
        return f"{float(v) / 1e6:.1f}M"
    if kind == "f2":
        return f"{float(v):.2f}"
    if kind == "f4":
        return f"{float(v):.4f}"
    return str(v)


def cell_table(data: StudyData) -> pd.DataFrame:
    """The cells as display strings: model, patch, Gflops, params, compute, FID, loss, status."""
    t = data.trials
    rows = []
    for _, r in t.iterrows():
        step = "" if pd.isna(r["last_step"]) else f"{int(r['last_step']):,}"
        if not pd.isna(r["steps"]) and data.source != "published":
            step += f" / {int(r['steps']):,}"
        fid = _fmt(r["final_fid"], "f2")
        if fid and not pd.isna(r["final_fid_step"]) and data.source != "published":
            fid += f" @{int(r['final_fid_step']):,}"
        rows.append({
            "model": r["model"] if isinstance(r["model"], str) else r["trial"],
            "patch": _fmt(r["patch_size"], "int"), "Gflops": _fmt(r["gflops"], "f2"),
            "params": _fmt(r["params"], "params"), "training compute (Gflops)": _fmt(r["compute_gflops"], "sci"),
            "step": step, "final FID": fid, "final loss": _fmt(r["final_loss_avg"], "f4"),
            "status": str(r["status"]).lower(),
        })
    table = pd.DataFrame(rows, columns=["model", "patch", "Gflops", "params", "training compute (Gflops)",
                                        "step", "final FID", "final loss", "status"])
    empty = [c for c in ("final loss", "params", "patch") if len(table) and (table[c] == "").all()]
    return table.drop(columns=empty)


def law_table(a: Analysis) -> pd.DataFrame:
    rows = []
    g, c = a.gflops, a.compute
    pct = lambda f: f"{f.level:.0%} CI"
    if g is not None:
        rows += [
            {"law": "FID vs Gflops", "parameter": "slope b (log-log)", "value": f"{g.b:.4f}",
             "interval": f"[{g.b_ci[0]:.4f}, {g.b_ci[1]:.4f}] ({pct(g)})"},
            {"law": "FID vs Gflops", "parameter": "prefactor exp(a)", "value": f"{g.prefactor:.4g}",
             "interval": f"[{math.exp(g.a_ci[0]):.4g}, {math.exp(g.a_ci[1]):.4g}]"},
            {"law": "FID vs Gflops", "parameter": "r(log Gflops, FID)", "value": f"{g.r_y:.4f}",
             "interval": f"p = {g.r_y_p:.2g}"},
            {"law": "FID vs Gflops", "parameter": "r(log Gflops, log FID)", "value": f"{g.r_log_y:.4f}",
             "interval": f"p = {g.r_log_y_p:.2g}"},
        ]
    if c is not None:
        from analysis.fit import _g

        for name, value in c.params().items():
            lo, hi = c.ci[name]
            rows.append({"law": "FID = E + A·C^-α", "parameter": {"alpha": "α"}.get(name, name),
                         "value": _g(value), "interval": f"[{_g(lo)}, {_g(hi)}] ({pct(c)})"})
    return pd.DataFrame(rows, columns=["law", "parameter", "value", "interval"])


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
                items.append((label, ", ".join(_fmt(v) if not isinstance(v, float) else f"{v:g}"
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
    "fid_vs_compute": "FID against training compute, one curve per model; the step line is the "
                      "compute-efficient frontier; dashed: the saturating Huber fit.",
    "fid_vs_step": "FID over training: panels hold patch size fixed (curves: model sizes), then model size "
                   "fixed (curves: patch sizes).",
    "loss_curves": "Training loss per trial against step and training compute (faint: raw; solid: binned median).",
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


def _frontier_table(a: Analysis) -> pd.DataFrame:
    f = a.frontier
    if f is None or not len(f):
        return pd.DataFrame()
    return pd.DataFrame({"model": f["model"].astype(str), "step": [_fmt(v, "int") for v in f["step"]],
                         "training compute (Gflops)": [_fmt(v, "sci") for v in f["compute_gflops"]],
                         "FID": [_fmt(v, "f2") for v in f[FID]]})


def _prediction_table(a: Analysis) -> pd.DataFrame:
    p = a.predictions
    if p is None:
        return pd.DataFrame()
    level = f"{a.compute.level:.0%}"
    return pd.DataFrame({
        "budget": p["budget"], "training compute (Gflops)": [_fmt(v, "sci") for v in p["compute_gflops"]],
        "predicted FID": [_fmt(v, "f2") for v in p["fid"]],
        f"{level} band of the law": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(p["ci_lo"], p["ci_hi"])],
        f"{level} for a new evaluation": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(p["pi_lo"], p["pi_hi"])],
    })


def _sections(a: Analysis) -> list[tuple[str, Any]]:
    """(kind, payload) blocks for one data set's fits; rendered by both writers."""
    blocks: list[tuple[str, Any]] = []
    laws = law_table(a)
    if len(laws):
        blocks.append(("table", laws))
    if a.gflops is not None:
        blocks.append(("pre", a.gflops.summary()))
    elif "gflops" in a.errors:
        blocks.append(("note", f"FID vs Gflops: {a.errors['gflops']}"))
    if a.compute is not None:
        blocks.append(("pre", a.compute.summary()))
        preds = _prediction_table(a)
        if len(preds):
            blocks.append(("h3", "Extrapolated compute budgets"))
            blocks.append(("table", preds))
    elif "compute" in a.errors and a.errors["compute"] != a.errors.get("gflops"):
        blocks.append(("note", f"FID vs training compute: {a.errors['compute']}"))
    front = _frontier_table(a)
    if len(front):
        blocks.append(("h3", "Compute-efficient frontier"))
        blocks.append(("table", front))
    return blocks


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
    plots = plot_study(data, out / "plots", fits=main.fits(), reference=published if ref else None)
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
