"""Scaling laws judged honestly: backtests on the paper's table, known laws recovered from
synthetic data, trial-level bootstraps, parameters not identified, robust outliers, prediction
bands, studies with failed cells, and the JSON the fits hand to reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.backtest import holdout, holdout_frontier, leave_one_out
from analysis.fit import compute_frontier, fit_fid_vs_gflops, fit_power_law, fit_saturating
from analysis.runs import load_published
from analysis.schema import FID


@pytest.fixture(scope="module")
def paper():
    return load_published()


# ------------------------------------------------------------------------------------------
# Synthetic studies (seeded)
# ------------------------------------------------------------------------------------------

TRUE_E, TRUE_A, TRUE_ALPHA = 5.0, 3e5, 0.4


def curves(seed: int = 0, *, n_trials: int = 10, n_pts: int = 16, offset: float = 0.1, noise: float = 0.01,
           e: float = TRUE_E) -> pd.DataFrame:
    """Trials along one law FID = E + A·C^-alpha, each over its own stretch of compute. Each trial's
    points share one multiplicative offset (its seed, its data order), plus a small per-point noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_trials):
        shift = rng.normal(0, offset)
        for j, c in enumerate(np.geomspace(10 ** (8 + 0.4 * k), 10 ** (9.5 + 0.4 * k), n_pts)):
            fid = (e + TRUE_A * c ** -TRUE_ALPHA) * np.exp(shift + rng.normal(0, noise))
            rows.append({"trial": f"t{k}", "model": f"t{k}", "step": j, "compute_gflops": c, FID: fid})
    return pd.DataFrame(rows)


def study(seed: int = 0, noise: float = 0.02) -> pd.DataFrame:
    """Five model sizes trained alike: each curve falls and flattens at a plateau that bigger models
    push lower, so the best FID per budget (the frontier) runs below most of the points."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in (0.5, 2, 8, 32, 128):
        for step in np.geomspace(1e4, 1e6, 10):
            fid = (5 + 200 * g**-0.6 + 400 * (step / 1e4) ** -0.7) * np.exp(rng.normal(0, noise))
            rows.append({"trial": f"m{g}", "model": f"m{g}", "step": int(step), "gflops": g,
                         "compute_gflops": g * 3 * 256 * step, FID: fid})
    return pd.DataFrame(rows)


def width(pair) -> float:
    return pair[1] - pair[0]


# ------------------------------------------------------------------------------------------
# The paper's table: backtests
# ------------------------------------------------------------------------------------------


def test_paper_holdout_of_xl2_and_leave_one_out(paper):
    h = holdout(paper.evals)  # default: the largest model
    assert h["model"] == "DiT-XL/2" and h["actual"] == pytest.approx(19.47) and h["n_train"] == 11
    assert 24 <= h["predicted"] <= 29  # hand check: 26.48, t interval [13.6, 51.5]
    lo, hi = h["interval"]
    assert lo <= 19.47 <= hi and h["covered"] is True
    assert h["log_error"] == pytest.approx(np.log(h["predicted"] / 19.47))
    json.dumps(h, allow_nan=False)

    loo = leave_one_out(paper.evals)
    assert loo.n == 12 and 0.25 <= loo.rmse_log <= 0.30  # hand check: 0.2744
    assert 0.75 <= loo.coverage <= 1.0
    xl2 = loo.rows.set_index("label").loc["DiT-XL/2"]
    assert xl2["predicted"] == pytest.approx(h["predicted"])  # the same refit


def test_paper_frontier_holdout_predicts_xl2(paper):
    h = holdout_frontier(paper.evals, n_boot=100)
    assert h["model"] == "DiT-XL/2" and h["law"] == "saturating" and h["extrapolated"] is True
    assert h["interval"][0] <= h["predicted"] <= h["interval"][1]
    assert h["covered"] == (h["interval"][0] <= 19.47 <= h["interval"][1])
    json.dumps(h, allow_nan=False)


# ------------------------------------------------------------------------------------------
# Known laws recovered, with the truth inside the intervals
# ------------------------------------------------------------------------------------------


def test_power_law_recovers_a_known_exponent():
    rng = np.random.default_rng(3)
    x = np.geomspace(0.3, 200, 15)
    y = 300 * x**-0.4 * np.exp(rng.normal(0, 0.05, len(x)))
    fit = fit_power_law(x, y, n_boot=1000, seed=0)
    assert fit.b == pytest.approx(-0.4, abs=0.03)
    iv = fit.b_interval
    assert iv.identified and iv.lo <= -0.4 <= iv.hi and fit.b_ci == iv.pair()
    assert fit.a_ci[0] <= np.log(300) <= fit.a_ci[1]
    assert fit.bootstrap == "points"  # one point per group: nothing to keep together


def test_saturating_law_recovers_known_parameters():
    evals = curves(1, offset=0.0, noise=0.03)
    fit = fit_saturating(evals, on="all", n_boot=200, seed=0)
    assert fit.bootstrap == "trials" and fit.n == len(evals)
    for name, truth in (("E", TRUE_E), ("A", TRUE_A), ("alpha", TRUE_ALPHA)):
        iv = fit.intervals[name]
        assert iv.identified and iv.lo <= truth <= iv.hi, (name, iv)
    assert fit.alpha == pytest.approx(TRUE_ALPHA, abs=0.05)


# ------------------------------------------------------------------------------------------
# Correlated curves: resample trials, not points
# ------------------------------------------------------------------------------------------


def test_trial_bootstrap_is_at_least_twice_as_wide_on_correlated_curves():
    evals = curves(0)
    default = fit_saturating(evals, on="all", n_boot=200, seed=0)  # trials by default
    points = fit_saturating(evals, on="all", n_boot=200, seed=0, bootstrap="points")
    ratio = width(default.ci["alpha"]) / width(points.ci["alpha"])
    assert ratio >= 2.0, ratio
    assert default.ci["alpha"][0] <= TRUE_ALPHA <= default.ci["alpha"][1]
    # The same for the power law once it knows which points share a trial.
    grouped = fit_power_law(evals["compute_gflops"], evals[FID], groups=evals["trial"], n_boot=500)
    loose = fit_power_law(evals["compute_gflops"], evals[FID], groups=evals["trial"], n_boot=500,
                          bootstrap="points")
    assert grouped.bootstrap == "trials" and width(grouped.b_ci) >= 2.0 * width(loose.b_ci)


# ------------------------------------------------------------------------------------------
# A parameter on its bound is not identified
# ------------------------------------------------------------------------------------------


def test_no_saturation_in_the_data_reports_E_not_identified():
    evals = curves(2, e=0.0, offset=0.0, noise=0.03)  # a pure power law: no floor to find
    fit = fit_saturating(evals, on="all", n_boot=200, seed=0)
    e = fit.intervals["E"]
    assert not e.identified and e.bound == 0.0 and e.at_bound > 0.1
    assert fit.intervals["alpha"].identified
    assert f"not identified (on its bound at 0 in {e.at_bound:.0%} of resamples)" in fit.summary()
    out = fit.to_json()["E"]
    assert out["interval"] is None and out["identified"] is False and out["at_bound_fraction"] > 0.1


# ------------------------------------------------------------------------------------------
# The frontier, not every evaluation pooled
# ------------------------------------------------------------------------------------------


def test_frontier_fit_passes_the_observed_frontier_at_the_largest_compute():
    evals = study()
    top = evals["compute_gflops"].max()
    observed = compute_frontier(evals)[FID].iloc[-1]
    frontier = fit_saturating(evals, n_boot=200, seed=0)  # on='frontier' by default
    pooled = fit_saturating(evals, on="all", n_boot=50, seed=0)
    assert frontier.on == "frontier" and frontier.n == len(compute_frontier(evals)) < frontier.n_evals
    miss = abs(np.log(frontier.predict([top]).iloc[0, 1] / observed))
    pooled_miss = abs(np.log(pooled.predict([top]).iloc[0, 1] / observed))
    assert miss < 0.06 and pooled_miss > 0.12, (miss, pooled_miss)
    band = frontier.predict([top], kind="prediction").iloc[0]
    assert band["lo"] <= observed <= band["hi"]

    h = holdout_frontier(evals, n_boot=100)
    assert h["trial"] == "m128" and h["covered"] and abs(h["log_error"]) < 0.15


def test_too_few_frontier_points_is_a_clear_error():
    evals = study()
    few = evals[(evals["step"] == evals["step"].max()) & (evals["gflops"] < 100)]  # four final FIDs
    assert len(compute_frontier(few)) == 4
    with pytest.raises(ValueError, match="the compute frontier has"):
        fit_saturating(few, n_boot=10)


# ------------------------------------------------------------------------------------------
# Outliers by the data's own spread; bands
# ------------------------------------------------------------------------------------------


def test_mad_outliers_flag_a_planted_point_and_spare_the_paper(paper):
    rng = np.random.default_rng(5)
    x = np.geomspace(1, 100, 12)
    y = 150 * x**-0.35 * np.exp(rng.normal(0, 0.04, len(x)))
    y[7] *= 2.0
    fit = fit_power_law(x, y, [f"p{i}" for i in range(len(x))], n_boot=200)
    assert fit.outliers == ["p7"] and "p7" in fit.summary()
    assert len(fit_fid_vs_gflops(paper.evals, n_boot=200).outliers) <= 1
    assert len(fit_saturating(paper.evals, n_boot=50).outliers) <= 1


def test_prediction_band_contains_the_confidence_band_everywhere():
    evals = curves(0)
    grid = np.geomspace(1e6, 1e16, 30)  # far past the data, where the slope's uncertainty dominates
    power = fit_power_law(evals["compute_gflops"], evals[FID], groups=evals["trial"], n_boot=500)
    saturating = fit_saturating(study(), n_boot=200)
    for fit in (power, saturating):
        conf, pred = fit.predict(grid), fit.predict(grid, kind="prediction")
        assert (pred["lo"] <= conf["lo"]).all() and (pred["hi"] >= conf["hi"]).all()
        assert (conf["lo"] <= conf.iloc[:, 1]).all() and (conf.iloc[:, 1] <= conf["hi"]).all()


# ------------------------------------------------------------------------------------------
# Failed and missing cells
# ------------------------------------------------------------------------------------------


def test_a_study_with_failed_and_missing_cells_fits_and_says_what_it_left_out():
    evals = study()
    evals.loc[(evals["trial"] == "m2") & (evals["step"] > 200_000), FID] = np.nan  # failed mid-run
    evals.loc[evals["trial"] == "m8", FID] = np.nan  # every evaluation failed
    last = evals["step"].max()
    at_last = evals[evals["step"] == last].assign(step=last)

    g = fit_fid_vs_gflops(at_last, n_boot=100)
    assert g.n == 3 and set(g.excluded["label"]) == {"m2", "m8"}
    assert all("no eval/fid at step" in r for r in g.excluded["reason"])

    s = fit_saturating(evals, n_boot=50)
    lost = evals[evals[FID].isna()]
    assert len(s.excluded) == len(lost) and s.n_evals == len(evals) - len(lost)
    assert set(s.excluded["label"]) == set(lost["model"] + "@" + lost["step"].astype(str))
    assert {e["label"] for e in s.to_json()["excluded"]} == set(s.excluded["label"])

    loo = leave_one_out(pd.concat([at_last, paper_like_rows()], ignore_index=True))
    assert {"m2", "m8"} <= set(loo.excluded["label"]) and loo.n == 6


def paper_like_rows() -> pd.DataFrame:
    """Three more models at the same step, so leave-one-out has groups enough."""
    return pd.DataFrame({"trial": ["x1", "x2", "x3"], "model": ["x1", "x2", "x3"], "step": [1_000_000] * 3,
                         "gflops": [1.0, 4.0, 64.0], "compute_gflops": [1.0, 4.0, 64.0], FID: [60.0, 40.0, 20.0]})


# ------------------------------------------------------------------------------------------
# JSON for reports
# ------------------------------------------------------------------------------------------


def test_to_json_has_stable_keys_with_plain_types(paper):
    p = fit_fid_vs_gflops(paper.evals, n_boot=200).to_json()
    json.dumps(p, allow_nan=False)
    assert isinstance(p["n"], int) and p["n"] == 12
    for key in ("pearson_logx_y", "pearson_logx_logy", "slope", "intercept", "r2", "level"):
        assert type(p[key]) is float, key
    for key in ("slope_ci", "intercept_ci"):
        assert len(p[key]) == 2 and all(type(v) is float for v in p[key])
    assert p["excluded"] == [] and isinstance(p["outliers"], list)

    s = fit_saturating(study(), n_boot=50).to_json()
    json.dumps(s, allow_nan=False)
    for name in ("E", "A", "alpha"):
        assert {"value", "interval", "identified", "at_bound_fraction"} <= set(s[name])
        assert type(s[name]["identified"]) is bool and type(s[name]["value"]) is float
    assert s["on"] == "frontier" and s["bootstrap"] == "trials" and isinstance(s["n"], int)
    assert {"level", "outliers", "excluded"} <= set(s)

    b = leave_one_out(paper.evals).to_json()
    json.dumps(b, allow_nan=False)
    assert type(b["rmse_log"]) is float and len(b["held_out"]) == 12
    assert {"label", "actual", "predicted", "interval", "covered", "log_error"} <= set(b["held_out"][0])
