"""The laws a user names (``power``, ``saturating``, ``envelope``), fitted on a CSV or a study,
as one JSON-able result: what ``ditscale fit`` prints.

Data: a CSV (one row per evaluation; column names as written) or a study's evaluations
(``analysis.runs.load_study``). For ``envelope`` a study's evaluations are first turned into the
envelope CSV's frame (``analysis.envelope.envelope_frame``: model, gflops, images_seen, fid), so
``ditscale fit STUDY --law envelope`` and ``ditscale fit --csv EXPORTED.csv --law envelope`` fit
the same numbers.

JSON keys (stable; floats are plain numbers, intervals ``[lo, hi]``):

- every law: ``law``, ``x``, ``y``, ``group``, ``source``, ``n``, ``excluded`` (list of
  ``{label, reason}``), ``level``;
- ``power`` (ln y = intercept + slope ln x, at one step when the data hold several):
  ``pearson_logx_y``, ``pearson_logx_logy``, ``slope``, ``slope_ci``, ``intercept``,
  ``intercept_ci``, ``r2``, ``outliers``, ``step``, ``loo_rmse_log`` (leave-one-group-out RMSE of
  ln y) and ``loo`` (per group: label, actual, predicted, interval); with ``--holdout V``:
  ``holdout: {model, predicted, interval, actual, covered, log_error}``;
- ``saturating`` (y = E + A C^-alpha on the compute frontier): ``E``, ``A``, ``alpha`` each
  ``{value, interval, level, identified, at_bound_fraction}``, ``on``, ``bootstrap``;
- ``envelope`` (y = E + A N^-a + B D^-b): ``E``, ``A``, ``a``, ``B``, ``b`` as above,
  ``n_opt_exponent``, ``n_opt_exponent_ci``, ``alpha``, ``alpha_ci``, ``isoflop`` (the
  cross-check, or ``{"error": why}``); with ``--holdout V``: the group's last evaluation
  predicted from a fit to the others;
- with ``--predict MODEL@STEPS``: ``prediction: {model, steps, gflops, images_seen, compute_gflops,
  predicted, interval}`` (a prediction interval: where a new evaluation would fall).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.schema import FID, LOSS
from dit.errors import ConfigError

LAWS = ("power", "saturating", "envelope")
COMPUTE = "compute_gflops"
ALIASES = {"fid": FID, "compute": COMPUTE, "loss": LOSS}
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


@dataclass
class FitRequest:
    """What to fit: the command line's choices, passed explicitly."""

    law: str = "power"
    x: str = "gflops"
    y: str = "fid"
    group: str | None = None
    holdout: str | None = None
    predict: str | None = None
    batch: int | None = None
    step: int | None = None
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95


@dataclass
class FitOutcome:
    """The JSON-able result and the same for a reader."""

    result: dict[str, Any]
    text: str


# ------------------------------------------------------------------------------------------
# Reading the data
# ------------------------------------------------------------------------------------------


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV of evaluations; ConfigError naming the file when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--csv {str(p)!r} does not exist")
    try:
        df = pd.read_csv(p)
    except Exception as err:  # noqa: BLE001 -- any parse failure is the user's file
        raise ConfigError(f"--csv {p}: not a readable CSV ({type(err).__name__}: {err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if not len(df):
        raise ConfigError(f"--csv {p}: no rows")
    return df


def column(df: pd.DataFrame, name: str, flag: str) -> str:
    """``name`` as a column of ``df``: as written, through an alias (fid, compute, loss), or for
    fid the first ``fid*`` column; ConfigError listing the columns otherwise."""
    if name in df.columns:
        return name
    alias = ALIASES.get(name.lower())
    if alias and alias in df.columns:
        return alias
    if name.lower() == "fid":
        found = [c for c in df.columns if str(c).lower().startswith("fid")]
        if found:
            return found[0]
    raise ConfigError(f"{flag} {name!r}: no such column; the data have {list(map(str, df.columns))}")


def _group_column(df: pd.DataFrame, req: FitRequest) -> str | None:
    if req.group:
        return column(df, req.group, "--group")
    for name in ("model", "trial"):
        if name in df.columns:
            return name
    return None


def _numeric(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    out = df.copy()
    for c in cols:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def _one_step(df: pd.DataFrame, y: str, step: int | None) -> tuple[pd.DataFrame, int | None]:
    """Rows at one training step: ``step``, else the one most rows reached (latest on ties)."""
    if "step" not in df.columns or df["step"].nunique(dropna=True) <= 1:
        if step is not None and "step" in df.columns and not (df["step"] == step).any():
            raise ConfigError(f"--step {step}: the data have no evaluation at that step")
        return df, (int(df["step"].dropna().iloc[0]) if "step" in df.columns and df["step"].notna().any()
                    else None)
    have = df.dropna(subset=[y]).groupby("step").size()
    if step is None:
        step = int(have[have == have.max()].index.max())
    elif step not in have.index:
        raise ConfigError(f"--step {step}: no {y} at that step; steps with values: "
                          f"{[int(s) for s in have.index]}")
    return df[df["step"] == step], int(step)


# ------------------------------------------------------------------------------------------
# --predict MODEL@STEPS
# ------------------------------------------------------------------------------------------


def parse_predict(text: str) -> tuple[str, int | None]:
    """``DiT-XL/2@400K`` -> ('DiT-XL/2', 400000); ``DiT-XL/2`` -> ('DiT-XL/2', None)."""
    model, _, steps = text.rpartition("@") if "@" in text else (text, "", "")
    if not model:
        raise ConfigError(f"--predict {text!r}: expected MODEL@STEPS, e.g. DiT-XL/2@400K")
    if not steps:
        return model, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", steps)
    if not m:
        raise ConfigError(f"--predict {text!r}: STEPS must be a number like 400000 or 400K")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value <= 0 or value > 1e12:
        raise ConfigError(f"--predict {text!r}: STEPS must be between 1 and 1e12")
    return model, int(value)


def _model_gflops(df: pd.DataFrame, group: str | None, x: str, model: str) -> float:
    """The model's Gflops: from the data, as a number, or counted for a DiT name (fvcore)."""
    if group and x in df.columns and (df[group].astype(str) == model).any():
        return float(pd.to_numeric(df.loc[df[group].astype(str) == model, x], errors="coerce").dropna().iloc[0])
    try:
        return float(model)
    except ValueError:
        pass
    from dit.flops import measure

    size = int(df["image_size"].dropna().iloc[0]) if "image_size" in df.columns and df["image_size"].notna().any() \
        else 256
    try:
        return float(measure(model, image_size=size).gflops)
    except Exception as err:  # noqa: BLE001 -- an unknown name is the user's input
        raise ConfigError(f"--predict {model!r}: not in the data and not a model ditscale can count "
                          f"({err}); give its Gflops as a number, e.g. 118.6@400K") from None


def _batch(df: pd.DataFrame, req: FitRequest) -> int:
    if req.batch:
        return int(req.batch)
    if "global_batch" in df.columns and df["global_batch"].notna().any():
        return int(pd.to_numeric(df["global_batch"], errors="coerce").dropna().mode().iloc[0])
    raise ConfigError("--predict with STEPS needs the global batch: pass --batch N (the data have no "
                      "global_batch column)")


# ------------------------------------------------------------------------------------------
# The three laws
# ------------------------------------------------------------------------------------------


def _power(df: pd.DataFrame, req: FitRequest, group: str | None) -> FitOutcome:
    from analysis.backtest import holdout, leave_one_out
    from analysis.fit import fit_power_law

    x, y = column(df, req.x, "--x"), column(df, req.y, "--y")
    rows, step = _one_step(_numeric(df, [x, y]), y, req.step)
    labels = rows[group].astype(str) if group else None
    fit = fit_power_law(rows[x], rows[y], labels, x_name=x, y_name=y, step=step, n_boot=req.n_boot,
                        seed=req.seed, level=req.level,
                        groups=labels.to_numpy() if labels is not None else None)
    result = {**fit.to_json(), "step": step}
    text = [fit.summary()]
    if group and rows[group].nunique() >= 4:
        loo = leave_one_out(rows, x=x, y=y, group=group)
        result["loo_rmse_log"] = float(loo.rmse_log)
        result["loo"] = loo.to_json()
        text.append(f"  leave-one-out RMSE of ln {y}: {loo.rmse_log:.4f} over {rows[group].nunique()} groups")
    if req.holdout:
        value = None if req.holdout == "largest" else _holdout_value(rows, group, req.holdout)
        h = holdout(rows, x=x, y=y, group=group, value=value)
        result["holdout"] = h
        text.append(_holdout_text(h))
    if req.predict:
        model, steps = parse_predict(req.predict)
        if steps is not None and step is not None and steps != step:
            raise ConfigError(f"--predict {req.predict!r}: the power law is fitted at step {step:,}; "
                              f"predict at that step (or use --law envelope for other steps)")
        gflops = _model_gflops(rows, group, x, model)
        band = fit.predict([gflops], kind="prediction").iloc[0]
        result["prediction"] = {"model": model, "steps": step, "gflops": gflops, "images_seen": None,
                                "compute_gflops": None, "predicted": float(band.iloc[1]),
                                "interval": [float(band["lo"]), float(band["hi"])]}
        text.append(_prediction_text(result["prediction"], req.level))
    return FitOutcome(result, "\n".join(text))


def _holdout_value(df: pd.DataFrame, group: str | None, value: str) -> str:
    if not group:
        raise ConfigError("--holdout needs a group column (--group, or a 'model' column in the data)")
    have = sorted(df[group].astype(str).unique())
    if value not in have:
        raise ConfigError(f"--holdout {value!r}: not a value of column {group!r}; it has {have} "
                          "(or say --holdout largest)")
    return value


def _holdout_text(h: dict[str, Any]) -> str:
    lo, hi = h["interval"]
    hit = "covers" if h.get("covered") else "MISSES"
    return (f"  hold-out {h['model']}: predicted {h['predicted']:.4g} [{lo:.4g}, {hi:.4g}] from the others, "
            f"actual {h['actual']:.4g} (the interval {hit} it; ln error {h.get('log_error', math.nan):+.3f})")


def _prediction_text(p: dict[str, Any], level: float) -> str:
    lo, hi = p["interval"]
    at = f" after {p['steps']:,} steps" if p.get("steps") else ""
    return f"  prediction for {p['model']}{at}: {p['predicted']:.4g}, {level:.0%} prediction interval [{lo:.4g}, {hi:.4g}]"


def _saturating(df: pd.DataFrame, req: FitRequest, group: str | None) -> FitOutcome:
    from analysis.backtest import holdout_frontier
    from analysis.fit import fit_saturating

    x = column(df, req.x if req.x != "gflops" else COMPUTE, "--x")
    y = column(df, req.y, "--y")
    rows = _numeric(df, [x, y])
    if "trial" not in rows.columns:
        rows["trial"] = rows[group].astype(str) if group else np.arange(len(rows)).astype(str)
    fit = fit_saturating(rows, x=x, y=y, n_boot=req.n_boot, seed=req.seed, level=req.level)
    result, text = dict(fit.to_json()), [fit.summary()]
    if req.holdout:
        h = holdout_frontier(rows, x=x, y=y, n_boot=req.n_boot, seed=req.seed, level=req.level)
        result["holdout"] = h
        text.append(_holdout_text(h))
    if req.predict:
        model, steps = parse_predict(req.predict)
        if steps is None:
            raise ConfigError(f"--predict {req.predict!r}: the compute law needs MODEL@STEPS")
        gflops = _model_gflops(rows, group, "gflops", model)
        compute = 3.0 * gflops * _batch(rows, req) * steps
        band = fit.predict([compute], kind="prediction").iloc[0]
        result["prediction"] = {"model": model, "steps": steps, "gflops": gflops,
                                "images_seen": _batch(rows, req) * steps, "compute_gflops": compute,
                                "predicted": float(band.iloc[1]), "interval": [float(band["lo"]), float(band["hi"])]}
        text.append(_prediction_text(result["prediction"], req.level))
    return FitOutcome(result, "\n".join(text))


def _envelope(df: pd.DataFrame, req: FitRequest, group: str | None) -> FitOutcome:
    from analysis.envelope import fit_envelope
    from analysis.isoflop import isoflop_profiles

    y = column(df, req.y, "--y")
    for need in ("gflops", "images_seen"):
        column(df, need, "--law envelope needs column")
    group = group or "model"
    if group not in df.columns:
        raise ConfigError(f"--law envelope needs a group column ({group!r}): one value per training curve")
    rows = _numeric(df, ["gflops", "images_seen", y]).rename(columns={y: "fid"})
    rows = rows[[group, "gflops", "images_seen", "fid"]]
    fit = fit_envelope(rows, group=group, n_boot=req.n_boot, seed=req.seed, level=req.level)
    result, text = dict(fit.to_json()), [fit.summary()]
    try:
        iso = isoflop_profiles(rows, group=group, n_boot=req.n_boot, seed=req.seed, level=req.level)
        result["isoflop"] = iso.to_json()
        text.append(iso.summary())
    except ValueError as err:
        result["isoflop"] = {"error": str(err)}
        text.append(f"  isoFLOP cross-check: {err}")
    if req.holdout:
        result["holdout"] = _envelope_holdout(rows, req, group)
        text.append(_holdout_text(result["holdout"]))
    if req.predict:
        result["prediction"] = _envelope_prediction(fit, rows, req, group)
        text.append(_prediction_text(result["prediction"], req.level))
    return FitOutcome(result, "\n".join(text))


def _envelope_holdout(rows: pd.DataFrame, req: FitRequest, group: str) -> dict[str, Any]:
    """Fit on every curve but one; predict that curve's last evaluation."""
    from analysis.envelope import fit_envelope

    if req.holdout == "largest":
        value = str(rows.groupby(group)["gflops"].max().idxmax())
    else:
        value = _holdout_value(rows, group, req.holdout)
    rest = rows[rows[group].astype(str) != value]
    held = rows[rows[group].astype(str) == value].sort_values("images_seen").iloc[-1]
    fit = fit_envelope(rest, group=group, n_boot=req.n_boot, seed=req.seed, level=req.level)
    band = fit.predict([held["gflops"]], [held["images_seen"]], kind="prediction").iloc[0]
    lo, hi, pred, actual = float(band["lo"]), float(band["hi"]), float(band["fid"]), float(held["fid"])
    return {"model": value, "predicted": pred, "interval": [lo, hi], "actual": actual,
            "covered": bool(lo <= actual <= hi), "log_error": math.log(pred / actual)}


def _envelope_prediction(fit: Any, rows: pd.DataFrame, req: FitRequest, group: str) -> dict[str, Any]:
    model, steps = parse_predict(req.predict or "")
    if steps is None:
        raise ConfigError(f"--predict {req.predict!r}: the envelope law needs MODEL@STEPS")
    gflops = _model_gflops(rows, group, "gflops", model)
    images = steps * _batch(rows, req)
    band = fit.predict([gflops], [images], kind="prediction").iloc[0]
    return {"model": model, "steps": steps, "gflops": gflops, "images_seen": images,
            "compute_gflops": 3.0 * gflops * images, "predicted": float(band["fid"]),
            "interval": [float(band["lo"]), float(band["hi"])]}


_RUNNERS: dict[str, Callable[[pd.DataFrame, FitRequest, str | None], FitOutcome]] = {
    "power": _power, "saturating": _saturating, "envelope": _envelope}


def run_fit(df: pd.DataFrame, req: FitRequest, *, source: str) -> FitOutcome:
    """Fit ``req.law`` on ``df``; a fit the data cannot support is a ConfigError saying why."""
    if req.law not in LAWS:
        raise ConfigError(f"--law {req.law!r}: choose one of {', '.join(LAWS)}")
    if not 0 < req.level < 1:
        raise ConfigError(f"--level must be between 0 and 1 (got {req.level})")
    group = _group_column(df, req)
    try:
        out = _RUNNERS[req.law](df, req, group)
    except ValueError as err:
        raise ConfigError(f"--law {req.law}: {err}") from None
    head = {"law": req.law, "x": req.x, "y": req.y, "group": group, "source": source}
    out.result = {**head, **out.result}
    return out


def study_frame(data: Any, law: str) -> pd.DataFrame:
    """A loaded study's evaluations as the frame ``run_fit`` takes (the envelope CSV's for envelope)."""
    if law == "envelope":
        from analysis.envelope import envelope_frame

        return envelope_frame(data.evals)
    return data.evals
