"""``ditscale fit``: the paper table's backtest figures, every named JSON key with its type, a real
MLflow study (with a failed cell) fitted directly and through its exported envelope CSV, and
clear exit-2 errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.runs import paper_table_path
from analysis.schema import FID, LOSS, TAG_KIND, TAG_PARENT, TAG_STUDY, TAG_TRIAL
from orchestrator.cli import main

TRUE = {"E": 2.0, "A": 30.0, "a": 0.5, "B": 400.0, "b": 0.35}
GFLOPS = {"DiT-a/2": 0.5, "DiT-b/2": 1.0, "DiT-c/2": 2.0, "DiT-d/2": 4.0, "DiT-e/2": 8.0, "DiT-f/2": 16.0}
STEPS = (100, 200, 400, 800, 1600, 3200)
BATCH = 32


def surface(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return TRUE["E"] + TRUE["A"] * n ** -TRUE["a"] + TRUE["B"] * d ** -TRUE["b"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------------------------------ the paper


def test_paper_table_power_law_holdout_and_loo(capsys):
    r = _json(capsys, "fit", "--csv", str(paper_table_path()), "--x", "gflops", "--y", "fid50k_400k",
              "--holdout", "DiT-XL/2", "--n-boot", "300")
    assert r["law"] == "power" and r["n"] == 12 and isinstance(r["n"], int)
    for key in ("pearson_logx_y", "pearson_logx_logy", "slope"):
        assert isinstance(r[key], float)
    assert r["pearson_logx_y"] == pytest.approx(-0.93, abs=0.02)  # the paper's figure
    lo, hi = r["slope_ci"]
    assert lo < r["slope"] < hi < 0
    h = r["holdout"]
    assert set(h) >= {"model", "predicted", "interval", "actual"} and h["model"] == "DiT-XL/2"
    assert 24 < h["predicted"] < 29 and h["actual"] == pytest.approx(19.47)
    assert h["interval"][0] <= 19.47 <= h["interval"][1]
    assert 0.25 < r["loo_rmse_log"] < 0.30


def test_paper_table_prediction_and_text_output(capsys):
    code, out, _ = _run(capsys, "fit", "--csv", str(paper_table_path()), "--y", "fid50k_400k",
                        "--predict", "DiT-XL/2", "--n-boot", "200")
    assert code == 0
    assert "slope" in out and "prediction for DiT-XL/2" in out and "leave-one-out" in out


# ------------------------------------------------------------------------------------------ envelope CSV


def _envelope_csv(tmp_path, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for model, n in GFLOPS.items():
        offset = rng.normal(0, 0.02)  # per-trial: the whole curve shares it
        for s in STEPS:
            d = s * BATCH
            fid = surface(np.float64(n), np.float64(d)) * np.exp(offset + rng.normal(0, 0.01))
            rows.append({"model": model, "gflops": n, "images_seen": d, "fid": fid})
    path = tmp_path / "curves.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_envelope_json_keys_and_true_exponents(tmp_path, capsys):
    r = _json(capsys, "fit", "--csv", str(_envelope_csv(tmp_path)), "--law", "envelope", "--n-boot", "100",
              "--predict", "DiT-f/2@6400", "--batch", str(BATCH))
    for name in ("E", "A", "a", "B", "b"):
        assert isinstance(r[name]["value"], float) and "interval" in r[name] and "identified" in r[name]
    for key in ("n_opt_exponent", "alpha"):
        assert isinstance(r[key], float)
        lo, hi = r[f"{key}_ci"]
        assert lo <= r[key] <= hi
    truth_k = TRUE["b"] / (TRUE["a"] + TRUE["b"])
    assert r["n_opt_exponent_ci"][0] <= truth_k <= r["n_opt_exponent_ci"][1]
    p = r["prediction"]
    assert p["images_seen"] == 6400 * BATCH and p["interval"][0] < p["predicted"] < p["interval"][1]


# ------------------------------------------------------------------------------------------ a study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real sqlite MLflow study: six models on the known surface, FID at six steps each, and a
    seventh cell that failed before its first evaluation."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("fitstudy")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("curves", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, tags={TAG_KIND: "study", TAG_STUDY: "curves"}).info.run_id
    rng = np.random.default_rng(1)
    for model, n in {**GFLOPS, "DiT-g/2": 32.0}.items():
        tags = {TAG_STUDY: "curves", TAG_TRIAL: model.replace("/", "-"), TAG_KIND: "trial", TAG_PARENT: parent}
        run = client.create_run(exp, tags=tags).info.run_id
        params = {"model": model, "patch_size": 2, "gflops": n, "global_batch": BATCH, "steps": STEPS[-1]}
        metrics = [Metric(LOSS, 0.5, 0, 10)]
        if model != "DiT-g/2":
            offset = rng.normal(0, 0.02)
            metrics += [Metric(FID, float(surface(n, s * BATCH) * np.exp(offset + rng.normal(0, 0.01))), 0, s)
                        for s in STEPS]
        client.log_batch(run, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(run, "FAILED" if model == "DiT-g/2" else "FINISHED")
    return uri


def test_study_power_law_says_what_it_left_out(study, capsys):
    r = _json(capsys, "fit", "curves", "--tracking-uri", study, "--n-boot", "200")
    assert r["source"] == "study:curves" and r["n"] == 6 and r["step"] == STEPS[-1]
    assert any(e["label"] == "DiT-g/2" and "failed" in e["reason"] for e in r["excluded"])


def test_study_envelope_equals_its_exported_csv(study, tmp_path, capsys):
    from analysis.envelope import envelope_frame
    from analysis.runs import load_study

    direct = _json(capsys, "fit", "curves", "--tracking-uri", study, "--law", "envelope", "--n-boot", "50")
    frame = envelope_frame(load_study("curves", study).evals)
    assert list(frame.columns) == ["model", "gflops", "images_seen", "fid"]
    path = tmp_path / "exported.csv"
    frame.to_csv(path, index=False)
    via_csv = _json(capsys, "fit", "--csv", str(path), "--law", "envelope", "--n-boot", "50")
    for name in ("E", "A", "a", "B", "b"):
        assert via_csv[name]["value"] == pytest.approx(direct[name]["value"], rel=1e-6)
    assert via_csv["n_opt_exponent"] == pytest.approx(direct["n_opt_exponent"], rel=1e-6)


def test_study_saturating_law_on_the_frontier(study, capsys):
    r = _json(capsys, "fit", "curves", "--tracking-uri", study, "--law", "saturating", "--n-boot", "100")
    for name in ("E", "A", "alpha"):
        assert isinstance(r[name]["value"], float) and "identified" in r[name]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv, needle", [
    (["--csv", "/nonexistent.csv"], "does not exist"),
    (["--csv", "PAPER", "--y", "nope"], "--y 'nope'"),
    (["--csv", "PAPER", "--y", "fid50k_400k", "--holdout", "DiT-Q/2"], "--holdout 'DiT-Q/2'"),
    (["--csv", "PAPER", "--y", "fid50k_400k", "--predict", "DiT-XL/2@lots"], "--predict"),
    (["--csv", "PAPER", "--y", "fid50k_400k", "--law", "envelope"], "images_seen"),
    (["--csv", "PAPER", "--y", "fid50k_400k", "--level", "2"], "--level"),
    ([], "name a STUDY"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    argv = [str(paper_table_path()) if a == "PAPER" else a for a in argv]
    code, _, err = _run(capsys, "fit", *argv, "--n-boot", "20")
    assert code == 2 and needle in err and "Traceback" not in err
