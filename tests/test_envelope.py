"""analysis.envelope and analysis.isoflop: the compute-optimal frontier from whole training curves.

Every study here is drawn from a known surface FID = E + A·N^-a + B·D^-b with a multiplicative
offset per trial (shared by its whole curve, as a seed or data order would be) and noise per
evaluation, so the fits can be held to the truth they were drawn from.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.envelope import envelope_frame, fit_envelope, read_envelope_csv
from analysis.isoflop import isoflop_profiles
from analysis.schema import FID
from dit.errors import ConfigError

TRUE = {"E": 2.0, "A": 30.0, "a": 0.5, "B": 2000.0, "b": 0.35}
BATCH = 256
N_OPT_EXPONENT = TRUE["b"] / (TRUE["a"] + TRUE["b"])
ALPHA = TRUE["a"] * TRUE["b"] / (TRUE["a"] + TRUE["b"])


def true_fid(n, d, E: float = TRUE["E"]):
    return E + TRUE["A"] * np.asarray(n, float) ** -TRUE["a"] + TRUE["B"] * np.asarray(d, float) ** -TRUE["b"]


def true_n_opt(compute: float) -> float:
    a, b, A, B = TRUE["a"], TRUE["b"], TRUE["A"], TRUE["B"]
    return (a * A / (b * B)) ** (1 / (a + b)) * (compute / 3) ** (b / (a + b))


def synthetic_evals(seed: int = 0, n_models: int = 7, n_evals: int = 10, E: float = TRUE["E"],
                    trial_sd: float = 0.03, point_sd: float = 0.02) -> pd.DataFrame:
    """A study's evals frame: N over 2 decades (1 to 100 Gflops), 1K to 100K steps at batch 256."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(np.geomspace(1.0, 100.0, n_models)):
        offset = rng.normal(0.0, trial_sd)  # one per trial: every point of the curve shares it
        for step in np.geomspace(1_000, 100_000, n_evals).round().astype(int):
            fid = true_fid(n, BATCH * step, E) * math.exp(offset + rng.normal(0.0, point_sd))
            rows.append({"trial": f"t{i}", "model": f"DiT-m{i}/2", "size": f"m{i}", "patch_size": 2,
                         "gflops": float(n), "params": int(1e6 * n), "global_batch": BATCH, "step": step,
                         "compute_gflops": float(n) * 3 * BATCH * step, FID: fid})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def evals() -> pd.DataFrame:
    return synthetic_evals(seed=0)


@pytest.fixture(scope="module")
def fit(evals):
    return fit_envelope(envelope_frame(evals), n_boot=100, seed=0)


def _inside(iv, value: float) -> bool:
    lo, hi = iv
    return lo <= value <= hi


# ------------------------------------------------------------------------------------------
# The surface and its intervals
# ------------------------------------------------------------------------------------------


def test_true_exponents_fall_inside_the_trial_bootstrap_intervals(fit):
    """Fails with ``bootstrap='points'`` as the default: resampling points treats a curve's shared
    offset as independent noise and the interval on a shrinks to about a fifth, missing 0.5."""
    j = fit.to_json()
    for k in ("a", "b"):
        assert j[k]["identified"] and _inside(j[k]["interval"], TRUE[k]), (k, j[k])
    assert _inside(j["n_opt_exponent_ci"], N_OPT_EXPONENT)
    assert _inside(j["alpha_ci"], ALPHA)
    assert fit.converged and fit.bootstrap == "trials" and fit.n_boot_ok >= 95
    assert j["a"]["value"] == pytest.approx(TRUE["a"], abs=0.1)
    assert j["b"]["value"] == pytest.approx(TRUE["b"], abs=0.05)
    assert fit.n == 70 and fit.n_groups == 7 and len(fit.excluded) == 0


def test_resampling_points_gives_too_narrow_an_interval_on_the_size_exponent(evals, fit):
    points = fit_envelope(envelope_frame(evals), n_boot=60, bootstrap="points", seed=0)
    width = {k: f.intervals["a"].hi - f.intervals["a"].lo for k, f in (("trials", fit), ("points", points))}
    assert width["trials"] > 2.5 * width["points"]
    assert not _inside(points.intervals["a"].pair(), TRUE["a"])


def test_no_floor_in_the_data_reports_E_as_not_identified():
    fit = fit_envelope(envelope_frame(synthetic_evals(seed=1, E=0.0)), n_boot=60, seed=0)
    E = fit.intervals["E"]
    assert not E.identified and E.bound == 0.0 and E.at_bound > 0.1
    assert "E" in fit.at_bounds
    j = fit.to_json()
    assert j["E"]["interval"] is None and j["E"]["identified"] is False and j["E"]["at_bound_fraction"] > 0.1
    assert "not identified (on its bound at 0" in fit.summary()
    # The exponents are still identified: no floor does not mean no law.
    assert _inside(fit.intervals["a"].pair(), TRUE["a"]) and _inside(fit.intervals["b"].pair(), TRUE["b"])


def test_predict_and_the_prediction_band_contains_the_confidence_band(fit):
    n, d = np.array([2.0, 10.0, 50.0]), np.array([1e6, 3e6, 1e7])
    conf = fit.predict(n, d)
    pred = fit.predict(n, d, kind="prediction")
    assert list(conf.columns[:5]) == ["gflops", "images_seen", "fid", "lo", "hi"]
    assert (conf["lo"] < conf["fid"]).all() and (conf["fid"] < conf["hi"]).all()
    assert (pred["lo"] <= conf["lo"]).all() and (pred["hi"] >= conf["hi"]).all()
    assert (pred["hi"] - pred["lo"] > conf["hi"] - conf["lo"]).all()
    assert conf["fid"].to_numpy() == pytest.approx(true_fid(n, d), rel=0.06)
    assert not conf["extrapolated"].any() and fit.predict(1000.0, 1e6)["extrapolated"].all()
    with pytest.raises(ValueError, match="kind"):
        fit.predict(n, d, kind="both")


def test_optimal_is_the_minimum_of_the_fitted_law_along_each_budget(fit):
    budgets = np.geomspace(1e7, 1e9, 5)
    opt = fit.optimal(budgets)
    assert list(opt.columns) == ["compute_gflops", "n_opt", "d_opt", "fid", "lo", "hi"]
    assert np.allclose(3 * opt["n_opt"] * opt["d_opt"], budgets)
    for c, n_opt, fid in zip(budgets, opt["n_opt"], opt["fid"]):
        for factor in (0.8, 1.25):  # a size either side, trained on the same budget, does worse
            assert fit.predict(n_opt * factor, c / (3 * n_opt * factor))["fid"].iloc[0] > fid
    slope = np.polyfit(np.log(budgets), np.log(opt["n_opt"]), 1)[0]
    assert slope == pytest.approx(fit.n_opt_exponent, rel=1e-9)
    assert (opt["lo"] <= opt["fid"]).all() and (opt["fid"] <= opt["hi"]).all()


def test_recommend_picks_the_model_the_true_surface_says_is_best(evals, fit):
    sizes = evals.groupby("model", as_index=False)[["gflops", "global_batch"]].first()
    middle = float(sizes["gflops"].iloc[3])  # 10 Gflops: the budget where it is the true optimum
    compute = 3 * (middle / true_n_opt(3.0)) ** ((TRUE["a"] + TRUE["b"]) / TRUE["b"])
    truth = true_fid(sizes["gflops"], compute / (3 * sizes["gflops"]))
    assert sizes["model"].iloc[int(np.argmin(truth))] == "DiT-m3/2"
    rec = fit.recommend(compute, sizes)
    assert rec["model"] == "DiT-m3/2" and rec["gflops"] == middle and not rec["extrapolated"]
    assert rec["images_seen"] == pytest.approx(compute / (3 * middle))
    assert rec["steps"] == round(rec["images_seen"] / BATCH) and rec["global_batch"] == BATCH
    lo, hi = rec["fid_interval"]
    assert lo < rec["fid"] < hi and _inside((lo, hi), float(truth.min()))
    assert 0.0 < rec["best_in_draws"] <= 1.0 and len(rec["candidates"]) == 7
    assert rec["n_opt_interval"][0] < rec["n_opt"] < rec["n_opt_interval"][1]
    json.dumps(rec)


def test_to_json_has_the_documented_keys_in_plain_types(fit):
    j = fit.to_json()
    text = json.dumps(j, allow_nan=False)
    assert json.loads(text) == j
    for k in ("E", "A", "a", "B", "b"):
        assert type(j[k]["value"]) is float and set(j[k]) >= {"value", "interval", "level", "identified",
                                                             "at_bound_fraction"}
    for k in ("n_opt_exponent", "alpha"):
        assert type(j[k]) is float and len(j[f"{k}_ci"]) == 2 and all(type(v) is float for v in j[f"{k}_ci"])
    assert j["n_opt_exponent"] == pytest.approx(j["b"]["value"] / (j["a"]["value"] + j["b"]["value"]))
    assert j["alpha"] == pytest.approx(j["a"]["value"] * j["b"]["value"] / (j["a"]["value"] + j["b"]["value"]))
    assert (j["n"], j["n_groups"], j["converged"], j["level"], j["bootstrap"], j["excluded"]) == (
        70, 7, True, 0.95, "trials", [])
    text = fit.summary()
    assert "fid = E + A * N^-a + B * D^-b" in text and "N_opt ~ C^" in text and "whole curves" in text


# ------------------------------------------------------------------------------------------
# The per-evaluation frame, its CSV and what is left out
# ------------------------------------------------------------------------------------------


def test_a_study_exports_to_the_envelope_csv_and_fits_the_same(evals, tmp_path):
    frame = envelope_frame(evals)
    assert list(frame.columns) == ["model", "gflops", "images_seen", "fid"] and len(frame) == len(evals)
    assert (frame["images_seen"] == evals["global_batch"] * evals["step"]).all()
    path = tmp_path / "envelope.csv"
    frame.to_csv(path, index=False)
    back = read_envelope_csv(path)
    a, b = fit_envelope(frame, n_boot=20, seed=3), fit_envelope(back, n_boot=20, seed=3)
    assert np.array_equal(a.theta, b.theta) and np.array_equal(a.boot, b.boot)
    assert a.to_json() == b.to_json()
    # The evals frame itself fits the same as its export.
    assert np.array_equal(fit_envelope(evals, n_boot=20, seed=3).theta, a.theta)


def test_images_seen_falls_back_to_compute_and_repeated_models_become_trials(evals):
    df = evals.copy()
    df.loc[df["trial"] == "t2", "global_batch"] = np.nan
    df.loc[df["trial"] == "t4", "model"] = "DiT-m3/2"  # a block design trains DiT-m3/2 twice
    frame = envelope_frame(df)
    t2 = (df["trial"] == "t2").to_numpy()
    # Without a batch size the images come from the compute: C / (3 N) = batch × step again.
    assert frame.loc[t2, "images_seen"].to_numpy() == pytest.approx(BATCH * df.loc[t2, "step"].to_numpy())
    names = set(frame["model"])
    assert {"t3", "t4"} <= names and "DiT-m3/2" not in names and "DiT-m0/2" in names
    assert frame["model"].nunique() == 7  # one group per training curve


def test_failed_trials_still_fit_and_are_listed_as_excluded(evals):
    df = evals[evals["trial"] != "t5"].copy()  # t5 failed before its first evaluation: no rows
    df.loc[(df["trial"] == "t1") & (df["step"] > 20_000), FID] = np.nan  # t1 diverged late
    df.loc[df["trial"] == "t6", FID] = np.nan  # t6's evaluations all failed
    df.loc[(df["trial"] == "t0") & (df["step"] == 1_000), FID] = 0.0  # a broken evaluation
    fit = fit_envelope(df, n_boot=20, seed=0)
    ex = fit.excluded
    assert fit.converged and fit.n_groups == 5 and fit.n == len(df) - len(ex)
    assert len(ex) == 4 + 10 + 1
    assert set(ex["reason"]) == {"missing or non-positive fid"}
    assert "DiT-m0/2@1000" in set(ex["label"]) and "DiT-m6/2@100000" in set(ex["label"])
    assert [e["label"] for e in fit.to_json()["excluded"]] == list(ex["label"])
    assert "excluded DiT-m6/2@1000: missing or non-positive fid" in fit.summary()


def test_too_few_curves_or_points_is_a_clear_error(evals):
    two = evals[evals["trial"].isin(["t0", "t1"])]
    with pytest.raises(ValueError, match="at least 3 curves with distinct gflops"):
        fit_envelope(two, n_boot=0)
    with pytest.raises(ValueError, match="at least 8 usable evaluations"):
        fit_envelope(evals[evals["step"] == 100_000], n_boot=0)
    with pytest.raises(ValueError, match="bootstrap"):
        fit_envelope(evals, bootstrap="rows")


def test_read_envelope_csv_names_the_file_and_the_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"model": ["a"], "gflops": [1.0], "fid": [3.0]}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"bad\.csv.*missing column\(s\) \['images_seen'\]"):
        read_envelope_csv(path)
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['trial', 'images_seen'\]"):
        read_envelope_csv(path, group="trial")
    with pytest.raises(ConfigError, match="does not exist"):
        read_envelope_csv(tmp_path / "none.csv")


# ------------------------------------------------------------------------------------------
# IsoFLOP profiles
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iso(evals):
    return isoflop_profiles(envelope_frame(evals), n_boot=100, seed=0)


def test_isoflop_exponent_agrees_with_the_truth_and_the_surface(iso, fit):
    assert iso.exponent == pytest.approx(N_OPT_EXPONENT, abs=0.06)
    assert _inside(iso.exponent_ci, N_OPT_EXPONENT)
    assert abs(iso.exponent - fit.n_opt_exponent) < 0.08
    assert len(iso.minima) >= 6 and len(iso.boot) >= 90
    # Each minimum is near the true optimum of its budget.
    truth = np.array([true_n_opt(c) for c in iso.minima["compute_gflops"]])
    assert np.abs(np.log(iso.minima["n_opt"].to_numpy() / truth)).max() < math.log(2.0)
    j = iso.to_json()
    json.dumps(j, allow_nan=False)
    assert j["exponent"] == iso.exponent and len(j["minima"]) == len(iso.minima)
    assert "N* ~ C^" in iso.summary()


def test_isoflop_never_extrapolates_a_curve_and_records_skipped_budgets(evals, iso):
    d_range = envelope_frame(evals).groupby("model")["images_seen"].agg(["min", "max"])
    prof = iso.profiles.join(d_range, on="model")
    assert ((prof["images_seen"] >= prof["min"] * (1 - 1e-9)) & (prof["images_seen"] <= prof["max"] * (1 + 1e-9))).all()
    assert np.allclose(3 * prof["gflops"] * prof["images_seen"], prof["budget"])
    # Beyond every curve no profile exists; past the big models' reach the minimum leaves the range.
    res = isoflop_profiles(evals, budgets=[1e6, 3e7, 1e8, 3e8, 1e12], n_boot=0)
    reasons = dict(res.skipped.itertuples(index=False))
    assert "0 curve(s) with distinct gflops reach it" in reasons[1e12]
    assert 1e12 not in set(res.profiles["budget"]) and len(res.minima) >= 2
    assert res.to_json()["exponent_ci"] is None and "skipped C = 1e+12" in res.summary()
