"""Backtests: does a law predict data it was not fitted to?

A fit's own residuals say how well it describes the points it saw; a scaling law is used to
predict points nobody has run yet. These refit the law without some of the data and compare
the prediction (with its 95 % prediction interval, where a new point would fall) to what was
observed.

``leave_one_out(df, x='gflops', y=FID, group='model')``  each group (model) held out in turn,
    the power law ln y = a + b ln x refitted on the rest, the held-out points predicted;
    returns a ``Backtest`` (``rmse_log``: RMSE of ln predicted − ln actual; ``coverage``: share
    of held-out points inside their interval).
``holdout(df, x, y, group='model', value=None)``  one group held out (default: the one with the
    largest x, i.e. the extrapolation a scaling study is for), predicted from the others.
``holdout_frontier(evals)``  the saturating law on the compute frontier: the trial with the
    largest compute held out, the frontier of the other trials fitted, and the held-out trial's
    best FID predicted at its largest compute.

Both power-law backtests take the evaluations at one step, as ``fit_fid_vs_gflops`` does
(``analysis.fit.at_step``: the step most trials reached, unless ``step`` is given); a frame
without ``step``/``trial`` columns is used as it is.

Keys (plain JSON values; ``log_error`` = ln predicted − ln actual, so > 0 means the law
predicted a worse value than observed):

- ``holdout`` / ``holdout_frontier``: ``model``, ``predicted``, ``interval`` ([lo, hi]),
  ``actual``, ``covered`` (bool), ``log_error``, ``law`` ("power" | "saturating"), ``level``,
  ``n_train`` (points the law was fitted to); ``holdout`` adds ``x`` and ``step``,
  ``holdout_frontier`` adds ``trial``, ``compute`` and ``extrapolated``.
- ``Backtest.to_json()``: ``kind`` ("leave-one-out"), ``x``, ``y``, ``group``, ``step``,
  ``level``, ``n``, ``rmse_log``, ``coverage``, ``excluded`` ([{label, reason}]), ``held_out``
  (per held-out point: ``label``, ``group``, ``x``, ``actual``, ``predicted``, ``interval``,
  ``covered``, ``log_error``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.fit import COMPUTE, at_step, fit_power_law, fit_saturating
from analysis.schema import FID

MIN_GROUPS = 4  # a refit on the others needs 3 points, and its t interval one spare degree of freedom


def _plain(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _verdict(predicted: float, lo: float, hi: float, actual: float) -> dict[str, Any]:
    """The comparison every backtest reports, as plain JSON values."""
    covered = bool(math.isfinite(lo) and math.isfinite(hi) and lo <= actual <= hi)
    return {"predicted": _plain(predicted), "interval": [_plain(lo), _plain(hi)], "actual": _plain(actual),
            "covered": covered, "log_error": _plain(math.log(predicted / actual))}


def _usable(df: pd.DataFrame, x: str, y: str, step: int | None) -> tuple[pd.DataFrame, int | None, pd.DataFrame]:
    """The rows a power-law backtest uses (one step, positive finite x and y) and those left out."""
    for col in (x, y):
        if col not in df:
            raise ValueError(f"no column {col!r} to backtest")
    if "step" in df and "trial" in df:
        rows, step, excluded = at_step(df, step, y)
    else:
        rows, excluded = df[df[y].notna()].copy(), pd.DataFrame(columns=["label", "reason"])
    xv, yv = pd.to_numeric(rows[x], errors="coerce"), pd.to_numeric(rows[y], errors="coerce")
    ok = (xv > 0) & (yv > 0) & np.isfinite(xv) & np.isfinite(yv)
    labels = rows["trial"].astype(str) if "trial" in rows else pd.Series(rows.index.astype(str), index=rows.index)
    bad = pd.DataFrame({"label": labels[~ok].tolist(),
                        "reason": [f"missing or non-positive {x}/{y}"] * int((~ok).sum())})
    rows = rows[ok].assign(**{x: xv[ok], y: yv[ok]})
    return rows, step, pd.concat([excluded, bad], ignore_index=True) if len(bad) else excluded


def _keys(rows: pd.DataFrame, group: str | None) -> np.ndarray:
    """Each row's group; without a group column every row is its own."""
    if group and group in rows:
        return rows[group].astype(str).to_numpy()
    return np.asarray([str(i) for i in rows.index])


@dataclass
class Backtest:
    """Leave-one-group-out predictions of a power law: one row per held-out point."""

    x_name: str
    y_name: str
    group: str | None
    step: int | None
    level: float
    rows: pd.DataFrame  # label, group, x, actual, predicted, lo, hi, covered, log_error
    excluded: pd.DataFrame  # label, reason

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def rmse_log(self) -> float:
        """Root mean square of ln predicted − ln actual over the held-out points."""
        return float(np.sqrt(np.mean(self.rows["log_error"].to_numpy(float) ** 2)))

    @property
    def coverage(self) -> float:
        """Share of held-out points inside their prediction interval (about ``level`` if honest)."""
        return float(self.rows["covered"].mean())

    def summary(self) -> str:
        at = f" at step {self.step:,}" if self.step is not None else ""
        lines = [f"leave-one-{self.group or 'point'}-out, ln {self.y_name} vs ln {self.x_name}{at}: "
                 f"RMSE of ln {self.y_name} {self.rmse_log:.4f} over {self.n} points; "
                 f"{self.coverage:.0%} inside their {self.level:.0%} prediction interval"]
        for r in self.rows.itertuples(index=False):
            lines.append(f"  {r.label}: predicted {r.predicted:.4g} [{r.lo:.4g}, {r.hi:.4g}], actual {r.actual:.4g}"
                         f" (ln error {r.log_error:+.3f}{'' if r.covered else ', outside'})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The backtest as plain JSON values (keys in the module docstring)."""
        held = [{"label": str(r.label), "group": str(r.group), "x": _plain(r.x),
                 **_verdict(r.predicted, r.lo, r.hi, r.actual)} for r in self.rows.itertuples(index=False)]
        return {"kind": "leave-one-out", "x": self.x_name, "y": self.y_name, "group": self.group,
                "step": None if self.step is None else int(self.step), "level": float(self.level), "n": int(self.n),
                "rmse_log": _plain(self.rmse_log), "coverage": _plain(self.coverage),
                "excluded": [{"label": str(a), "reason": str(b)} for a, b in self.excluded.itertuples(index=False)],
                "held_out": held}


def _predict_held_out(train: pd.DataFrame, test: pd.DataFrame, x: str, y: str, level: float):
    """The power law fitted to ``train`` and its prediction band at ``test``'s x (no resamples:
    the classic t prediction interval of ordinary least squares in log-log space)."""
    fit = fit_power_law(train[x], train[y], x_name=x, y_name=y, n_boot=0, level=level)
    return fit, fit.predict(test[x].to_numpy(float), kind="prediction", level=level)


def leave_one_out(df: pd.DataFrame, x: str = "gflops", y: str = FID, group: str | None = "model", *,
                  step: int | None = None, level: float = 0.95) -> Backtest:
    """Each group held out in turn and predicted by the power law fitted to the others."""
    rows, step, excluded = _usable(df, x, y, step)
    keys = _keys(rows, group)
    uniq = list(dict.fromkeys(keys))
    if len(uniq) < MIN_GROUPS:
        raise ValueError(f"leave-one-out needs at least {MIN_GROUPS} groups ({group or 'points'}) with {y}; "
                         f"got {len(uniq)}")
    out = []
    for key in uniq:
        test = rows[keys == key]
        _, band = _predict_held_out(rows[keys != key], test, x, y, level)
        labels = test["model"].astype(str) if "model" in test else pd.Series([key] * len(test))
        out.append(pd.DataFrame({"label": labels.to_numpy(), "group": key, "x": test[x].to_numpy(float),
                                 "actual": test[y].to_numpy(float), "predicted": band.iloc[:, 1].to_numpy(),
                                 "lo": band["lo"].to_numpy(), "hi": band["hi"].to_numpy()}))
    table = pd.concat(out, ignore_index=True)
    table["covered"] = (table["lo"] <= table["actual"]) & (table["actual"] <= table["hi"])
    table["log_error"] = np.log(table["predicted"] / table["actual"])
    table.attrs["rmse_log"] = float(np.sqrt(np.mean(table["log_error"] ** 2)))  # for plots given the frame alone
    return Backtest(x_name=x, y_name=y, group=group, step=step, level=level, rows=table,
                    excluded=excluded.reset_index(drop=True))


def holdout(df: pd.DataFrame, x: str = "gflops", y: str = FID, group: str | None = "model",
            value: str | None = None, *, step: int | None = None, level: float = 0.95) -> dict[str, Any]:
    """One group (default: the one with the largest x) predicted by the power law of the others.

    A group with several rows is compared at its row with the largest x."""
    rows, step, _ = _usable(df, x, y, step)
    keys = _keys(rows, group)
    if not len(rows):
        raise ValueError(f"no {y} values to backtest")
    value = str(keys[int(np.argmax(rows[x].to_numpy(float)))] if value is None else value)
    held = rows[keys == value]
    if not len(held):
        raise ValueError(f"hold-out {value!r}: no such {group or 'row'} with {y}; have {sorted(set(keys))}")
    row = held.loc[[held[x].idxmax()]]
    fit, band = _predict_held_out(rows[keys != value], row, x, y, level)
    b = band.iloc[0]
    return {"model": value, **_verdict(b.iloc[1], b["lo"], b["hi"], float(row[y].iloc[0])), "law": "power",
            "level": float(level), "n_train": int(fit.n), "x": _plain(row[x].iloc[0]),
            "step": None if step is None else int(step)}


def holdout_frontier(evals: pd.DataFrame, *, x: str = COMPUTE, y: str = FID, trial: str | None = None,
                     level: float = 0.95, n_boot: int = 200, seed: int = 0, **fit_kwargs: Any) -> dict[str, Any]:
    """The saturating frontier law of the other trials, predicting one trial's best value at its
    largest compute (default trial: the one with the largest compute). ``fit_kwargs`` go to
    ``fit_saturating``; its prediction band needs resamples, so ``n_boot`` must be positive."""
    if "trial" not in evals or x not in evals or y not in evals:
        raise ValueError(f"a frontier hold-out needs columns trial, {x} and {y}")
    if n_boot < 1:
        raise ValueError("a frontier hold-out needs n_boot >= 1 (its prediction band is a bootstrap)")
    cx, cy = pd.to_numeric(evals[x], errors="coerce"), pd.to_numeric(evals[y], errors="coerce")
    ok = (cx > 0) & (cy > 0) & np.isfinite(cx) & np.isfinite(cy)
    if not ok.any():
        raise ValueError(f"no usable {y} values to backtest")
    trial = str(evals.loc[cx[ok].idxmax(), "trial"]) if trial is None else str(trial)
    mine = ok & (evals["trial"].astype(str) == trial)
    if not mine.any():
        raise ValueError(f"hold-out trial {trial!r}: no usable {y} values")
    fit = fit_saturating(evals[evals["trial"].astype(str) != trial], x=x, y=y, on="frontier", n_boot=n_boot,
                         seed=seed, level=level, **fit_kwargs)
    compute, actual = float(cx[mine].max()), float(cy[mine].min())
    b = fit.predict([compute], kind="prediction", level=level).iloc[0]
    model = evals.loc[mine, "model"].iloc[0] if "model" in evals and evals.loc[mine, "model"].notna().any() else trial
    return {"model": str(model), **_verdict(b.iloc[1], b["lo"], b["hi"], actual), "law": "saturating",
            "level": float(level), "n_train": int(fit.n), "trial": trial, "compute": compute,
            "extrapolated": bool(b["extrapolated"])}
