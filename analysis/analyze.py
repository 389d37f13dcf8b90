"""Every fit a report shows, for one data set (a study or a published table), in one place.

``analyze`` runs, each only where the data allow it (a fit that cannot run records why in
``errors``, it never raises):

- FID vs Gflops at one step (``analysis.fit``) with its backtests (``analysis.backtest``):
  leave-one-model-out and the largest model held out;
- FID vs training compute, a saturating law on the compute frontier, and its predictions at
  bigger budgets (confidence and prediction bands);
- the compute-optimal frontier from whole training curves (``analysis.envelope``), cross-checked
  by isoFLOP profiles (``analysis.isoflop``), and which of the study's models each budget should
  train;
- loss laws (``analysis.loss_laws``): loss against compute, and FID against loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.runs import StudyData

BUDGET_FACTORS = (1, 10, 100)  # predictions at the largest compute in the data, and 10x, 100x
FIT_ERRORS = (ValueError, np.linalg.LinAlgError, RuntimeError)


@dataclass
class Analysis:
    """Fits of one data set; ``errors`` says why a fit is missing."""

    data: StudyData
    gflops: Any = None  # PowerLawFit
    compute: Any = None  # SaturatingFit (on the compute frontier)
    frontier: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    loo: Any = None  # Backtest: leave one model out
    holdout: dict[str, Any] | None = None  # the largest model predicted from the others
    envelope: Any = None  # EnvelopeFit
    optimal: pd.DataFrame | None = None  # compute_gflops, n_opt, d_opt, fid, lo, hi
    isoflop: Any = None  # IsoflopResult
    recommendations: pd.DataFrame | None = None  # budget, compute_gflops, model, gflops, fid, lo, hi
    losses: Any = None  # LossLaws
    errors: dict[str, str] = field(default_factory=dict)

    def fits(self) -> dict[str, Any]:
        return {k: v for k, v in (("gflops", self.gflops), ("compute", self.compute)) if v is not None}


def _attempt(out: Analysis, key: str, fn) -> Any:
    try:
        return fn()
    except FIT_ERRORS as err:
        out.errors[key] = str(err)
        return None


def _gflops_laws(out: Analysis, step: int | None, n_boot: int, seed: int) -> None:
    from analysis.backtest import holdout, leave_one_out
    from analysis.fit import at_step, fit_fid_vs_gflops

    evals = out.data.evals
    out.gflops = _attempt(out, "gflops", lambda: fit_fid_vs_gflops(evals, step, n_boot=n_boot, seed=seed))
    if out.gflops is None:
        return
    rows, _, _ = at_step(evals, out.gflops.step)
    if rows["model"].nunique() < 4:
        out.errors["backtest"] = "backtests need at least 4 models at the fitted step"
        return
    out.loo = _attempt(out, "backtest", lambda: leave_one_out(rows))
    out.holdout = _attempt(out, "backtest", lambda: holdout(rows))


def _compute_laws(out: Analysis, n_boot: int, seed: int) -> None:
    from analysis.fit import compute_frontier, fit_saturating

    evals = out.data.evals
    out.frontier = compute_frontier(evals)
    out.compute = _attempt(out, "compute", lambda: fit_saturating(evals, n_boot=n_boot, seed=seed))
    if out.compute is None:
        return
    top = float(out.compute.used["compute"].max())
    budgets = [top * k for k in BUDGET_FACTORS]
    conf = out.compute.predict(budgets)
    pred = out.compute.predict(budgets, kind="prediction")
    out.predictions = pd.DataFrame({
        "budget": ["largest in data", "10x", "100x"], "compute_gflops": budgets,
        "fid": conf.iloc[:, 1], "ci_lo": conf["lo"], "ci_hi": conf["hi"], "pi_lo": pred["lo"],
        "pi_hi": pred["hi"]})


def _sizes(evals: pd.DataFrame) -> pd.DataFrame:
    """The study's models with their Gflops: the candidates a budget can train."""
    return evals.dropna(subset=["gflops"]).drop_duplicates("model")[["model", "gflops"]].reset_index(drop=True)


def _frontier_laws(out: Analysis, n_boot: int, seed: int) -> None:
    from analysis.envelope import envelope_frame, fit_envelope
    from analysis.isoflop import isoflop_profiles

    frame = _attempt(out, "envelope", lambda: envelope_frame(out.data.evals))
    if frame is None or not len(frame):
        out.errors.setdefault("envelope", "no evaluations along training curves")
        return
    if frame["images_seen"].nunique() < 3:
        out.errors["envelope"] = ("one training length only: the envelope law needs evaluations along "
                                  "training curves (FID at several steps per model)")
        return
    out.envelope = _attempt(out, "envelope", lambda: fit_envelope(frame, n_boot=n_boot, seed=seed))
    out.isoflop = _attempt(out, "isoflop", lambda: isoflop_profiles(frame, n_boot=n_boot, seed=seed))
    if out.envelope is None:
        return
    top = float((3.0 * frame["gflops"] * frame["images_seen"]).max())
    budgets = [top * k for k in BUDGET_FACTORS]
    out.optimal = out.envelope.optimal(np.geomspace(top / 100, top * 100, 60))
    sizes = _sizes(out.data.evals)
    batch = pd.to_numeric(out.data.evals.get("global_batch"), errors="coerce").dropna()
    rows = []
    for label, c in zip(("largest in data", "10x", "100x"), budgets):
        rec = out.envelope.recommend(c, sizes, global_batch=int(batch.mode().iloc[0]) if len(batch) else None)
        lo, hi = rec.get("fid_interval") or (np.nan, np.nan)
        rows.append({"budget": label, "compute_gflops": c, "model": rec["model"], "gflops": rec["gflops"],
                     "fid": rec["fid"], "lo": lo, "hi": hi, "steps": rec.get("steps"),
                     "best_in_draws": rec.get("best_in_draws")})
    out.recommendations = pd.DataFrame(rows)


def _loss_laws(out: Analysis, n_boot: int, seed: int) -> None:
    from analysis.loss_laws import fit_loss_laws

    if out.data.source == "published":
        return
    out.losses = _attempt(out, "losses", lambda: fit_loss_laws(out.data.evals, out.data.losses,
                                                               n_boot=n_boot, seed=seed))


def analyze(data: StudyData, *, step: int | None = None, n_boot: int = 2000, n_boot_saturating: int = 1000,
            n_boot_envelope: int = 200, seed: int = 0) -> Analysis:
    """The fits the data allow; a fit that cannot run is recorded, never raised."""
    out = Analysis(data)
    if not data.has_fid:
        out.errors["gflops"] = out.errors["compute"] = "no FID yet"
        return out
    _gflops_laws(out, step, n_boot, seed)
    _compute_laws(out, n_boot_saturating, seed)
    _frontier_laws(out, n_boot_envelope, seed)
    _loss_laws(out, min(n_boot_saturating, 500), seed)
    return out
