"""The report's tables: display strings in readable units, one function per table.

Units: the project's "Gflops" count one multiply-add as one flop (fvcore, like the DiT paper),
so a FLOP count is twice the number shown; training compute is Gflops x 3 x images (forward
plus a backward of twice the forward), in the same multiply-add units. Headers say so.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis.runs import StudyData
from analysis.units import format_flops, format_params

COMPUTE_HEADER = "training compute (Gflops, multiply-adds)"


def fmt(v: Any, kind: str = "g") -> str:
    """One value as display text ('' when missing)."""
    if v is None or v is pd.NA:
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
        return format_params(float(v))
    if kind == "flops":
        return format_flops(float(v))
    if kind == "pct":
        return f"{float(v):.0%}"
    if kind in ("f2", "f4"):
        return f"{float(v):.{kind[1]}f}"
    return str(v)


def _interval_text(fit: Any, name: str, digits: str = "{:.4g}") -> str:
    """A parameter's interval, or 'not identified' when the fit says so."""
    intervals = getattr(fit, "intervals", None) or {}
    if name in intervals:
        return intervals[name].text(digits) + f" ({fit.level:.0%})"
    lo, hi = fit.ci[name]
    return f"[{digits.format(lo)}, {digits.format(hi)}] ({fit.level:.0%})"


def cell_table(data: StudyData) -> pd.DataFrame:
    """The cells as display strings: model, patch, Gflops, params, compute, FID, loss, status."""
    rows = []
    for _, r in data.trials.iterrows():
        step = "" if pd.isna(r["last_step"]) else f"{int(r['last_step']):,}"
        if not pd.isna(r["steps"]) and data.source != "published":
            step += f" / {int(r['steps']):,}"
        fid = fmt(r["final_fid"], "f2")
        if fid and not pd.isna(r["final_fid_step"]) and data.source != "published":
            fid += f" @{int(r['final_fid_step']):,}"
        rows.append({
            "model": r["model"] if isinstance(r["model"], str) else r["trial"],
            "patch": fmt(r["patch_size"], "int"), "forward compute": fmt(r["gflops"], "flops"),
            "params": fmt(r["params"], "params"), COMPUTE_HEADER: fmt(r["compute_gflops"], "sci"),
            "step": step, "final FID": fid, "final loss": fmt(r["final_loss_avg"], "f4"),
            "status": str(r["status"]).lower(),
        })
    table = pd.DataFrame(rows, columns=["model", "patch", "forward compute", "params", COMPUTE_HEADER,
                                        "step", "final FID", "final loss", "status"])
    empty = [c for c in ("final loss", "params", "patch") if len(table) and (table[c] == "").all()]
    return table.drop(columns=empty)


def law_table(a: Any) -> pd.DataFrame:
    """Each fitted parameter with its interval (or 'not identified')."""
    rows = []
    g, c = a.gflops, a.compute
    if g is not None:
        law = "FID vs Gflops"
        rows += [
            {"law": law, "parameter": "slope b (log-log)", "value": f"{g.b:.4f}",
             "interval": f"[{g.b_ci[0]:.4f}, {g.b_ci[1]:.4f}] ({g.level:.0%} CI)"},
            {"law": law, "parameter": "prefactor exp(a)", "value": f"{g.prefactor:.4g}",
             "interval": f"[{math.exp(g.a_ci[0]):.4g}, {math.exp(g.a_ci[1]):.4g}]"},
            {"law": law, "parameter": "r(log Gflops, FID)", "value": f"{g.r_y:.4f}", "interval": f"p = {g.r_y_p:.2g}"},
            {"law": law, "parameter": "r(log Gflops, log FID)", "value": f"{g.r_log_y:.4f}",
             "interval": f"p = {g.r_log_y_p:.2g}"},
        ]
    if c is not None:
        for name, value in c.params().items():
            rows.append({"law": "FID = E + A·C^-α (frontier)", "parameter": {"alpha": "α"}.get(name, name),
                         "value": f"{value:.4g}", "interval": _interval_text(c, name)})
    e = a.envelope
    if e is not None:
        for name in ("E", "A", "a", "B", "b"):
            rows.append({"law": "FID = E + A·N^-a + B·D^-b", "parameter": name,
                         "value": f"{e.params()[name]:.4g}", "interval": _interval_text(e, name)})
        j = e.to_json()
        for key, label in (("n_opt_exponent", "N_opt ∝ C^k: k = b/(a+b)"), ("alpha", "FID_opt − E ∝ C^-α: α = ab/(a+b)")):
            lo, hi = j[f"{key}_ci"] or (math.nan, math.nan)
            rows.append({"law": "compute-optimal frontier", "parameter": label, "value": f"{j[key]:.4g}",
                         "interval": f"[{lo:.4g}, {hi:.4g}] ({e.level:.0%})"})
    if a.isoflop is not None:
        lo, hi = a.isoflop.exponent_ci
        rows.append({"law": "isoFLOP profiles (cross-check)", "parameter": "N_opt ∝ C^k: k",
                     "value": f"{a.isoflop.exponent:.4g}", "interval": f"[{lo:.4g}, {hi:.4g}]"})
    return pd.DataFrame(rows, columns=["law", "parameter", "value", "interval"])


def frontier_table(a: Any) -> pd.DataFrame:
    f = a.frontier
    if f is None or not len(f):
        return pd.DataFrame()
    from analysis.schema import FID

    return pd.DataFrame({"model": f["model"].astype(str), "step": [fmt(v, "int") for v in f["step"]],
                         COMPUTE_HEADER: [fmt(v, "sci") for v in f["compute_gflops"]],
                         "FID": [fmt(v, "f2") for v in f[FID]]})


def prediction_table(a: Any) -> pd.DataFrame:
    p = a.predictions
    if p is None:
        return pd.DataFrame()
    level = f"{a.compute.level:.0%}"
    return pd.DataFrame({
        "budget": p["budget"], COMPUTE_HEADER: [fmt(v, "sci") for v in p["compute_gflops"]],
        "predicted FID": [fmt(v, "f2") for v in p["fid"]],
        f"{level} band of the law": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(p["ci_lo"], p["ci_hi"])],
        f"{level} for a new evaluation": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(p["pi_lo"], p["pi_hi"])],
    })


def backtest_table(a: Any) -> pd.DataFrame:
    """Leave-one-model-out: each model predicted by a law fitted to the others."""
    if a.loo is None:
        return pd.DataFrame()
    df = a.loo.rows
    held = (a.holdout or {}).get("model")
    rows = []
    for _, r in df.iterrows():
        lo, hi = r["lo"], r["hi"]
        inside = lo <= r["actual"] <= hi
        rows.append({"model held out": str(r["label"]) + (" (largest)" if str(r["label"]) == held else ""),
                     "actual FID": f"{r['actual']:.2f}", "predicted": f"{r['predicted']:.2f}",
                     "95% prediction interval": f"[{lo:.2f}, {hi:.2f}]" + ("" if inside else " misses"),
                     "ln error": f"{math.log(r['predicted'] / r['actual']):+.3f}"})
    return pd.DataFrame(rows)


def recommendation_table(a: Any) -> pd.DataFrame:
    """Which of the study's models each budget should train, by the fitted envelope law."""
    r = a.recommendations
    if r is None or not len(r):
        return pd.DataFrame()
    out = pd.DataFrame({"budget": r["budget"], COMPUTE_HEADER: [fmt(v, "sci") for v in r["compute_gflops"]],
                        "train": r["model"].astype(str),
                        "forward compute": [fmt(v, "flops") for v in r["gflops"]],
                        "predicted FID": [fmt(v, "f2") for v in r["fid"]]})
    if "lo" in r and "hi" in r:
        out["interval"] = [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(r["lo"], r["hi"])]
    if "steps" in r:
        out["steps at the study's batch"] = [fmt(v, "int") for v in r["steps"]]
    if "best_in_draws" in r:
        out["same choice in bootstrap draws"] = [fmt(v, "pct") for v in r["best_in_draws"]]
    return out
