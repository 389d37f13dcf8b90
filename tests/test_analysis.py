"""analysis: the paper-table fits, the saturating fit, the frontier, MLflow frames, plots, report, CLI."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.fit import (
    compute_frontier,
    fit_fid_vs_gflops,
    fit_saturating,
    frontier_at,
)
from analysis.runs import FID, LOSS, load_published, load_study, paper_table_path
from analysis.schema import TAG_KIND, TAG_PARENT, TAG_STUDY, TAG_TRIAL
from dit.errors import ConfigError

# ------------------------------------------------------------------------------------------
# The paper's table
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper():
    return load_published()


def test_paper_table_loads_with_the_papers_training_compute(paper):
    assert paper_table_path().is_file()
    assert len(paper.trials) == 12 and len(paper.evals) == 12
    xl2 = paper.evals.set_index("model").loc["DiT-XL/2"]
    assert xl2["compute_gflops"] == pytest.approx(118.64 * 3 * 256 * 400_000)
    assert xl2[FID] == pytest.approx(19.47) and xl2["size"] == "XL" and xl2["patch_size"] == 2
    assert paper.trials.set_index("model").loc["DiT-S/8", "params"] == 33_000_000
    assert paper.has_fid and "400K" in paper.protocol


def test_paper_table_fit_reproduces_the_papers_correlation_and_slope(paper):
    fit = fit_fid_vs_gflops(paper.evals, n_boot=2000, seed=0)
    # The paper's -0.93 is Pearson r of log Gflops with FID itself (-0.9298);
    # with log FID it is -0.9356, which rounds to -0.94.
    assert fit.r_y == pytest.approx(-0.93, abs=0.005)
    assert fit.r_log_y == pytest.approx(-0.9356, abs=0.0005)
    assert abs(fit.r_log_y + 0.93) > 0.005
    assert fit.b == pytest.approx(-0.36, abs=0.02)
    lo, hi = fit.b_ci
    assert lo < fit.b < hi < 0
    assert fit.step == 400_000 and fit.n == 12 and len(fit.excluded) == 0 and fit.n_boot_ok == 2000
    again = fit_fid_vs_gflops(paper.evals, n_boot=2000, seed=0)
    assert again.b_ci == fit.b_ci  # seeded
    band = fit.predict([1.0, 100.0])
    assert (band["lo"] < band["fid"]).all() and (band["fid"] < band["hi"]).all()
    text = fit.summary()
    assert "-0.9298" in text and "-0.9356" in text and "slope b = -0.3648" in text


# ------------------------------------------------------------------------------------------
# Saturating fit and frontier
# ------------------------------------------------------------------------------------------

TRUE_E, TRUE_A, TRUE_ALPHA = 8.0, 5e6, 0.5
OUTLIER_ROWS = [3, 17, 31, 44]


def synthetic_evals(seed: int = 1) -> pd.DataFrame:
    """Five models x ten evaluations on FID = E + A*C^-alpha, 3% log noise, four gross outliers."""
    rng = np.random.default_rng(seed)
    rows = []
    for gflops in (0.5, 2, 8, 30, 100):
        for step in np.geomspace(2e4, 4e5, 10):
            c = gflops * 3 * 256 * step * 10
            fid = (TRUE_E + TRUE_A * c ** -TRUE_ALPHA) * np.exp(rng.normal(0, 0.03))
            rows.append({"trial": f"m{gflops}", "model": f"m{gflops}", "step": int(step), "gflops": gflops,
                         "compute_gflops": c, FID: fid})
    df = pd.DataFrame(rows)
    df.loc[OUTLIER_ROWS, FID] *= 2.5
    return df


def test_saturating_fit_recovers_known_law_despite_outliers():
    evals = synthetic_evals()
    fit = fit_saturating(evals, on="all", n_boot=200, seed=0)  # every evaluation: the robust loss at work
    assert fit.converged and fit.n_starts_ok == fit.n_starts and fit.n == 50
    assert fit.E == pytest.approx(TRUE_E, rel=0.15)
    assert fit.alpha == pytest.approx(TRUE_ALPHA, abs=0.02)
    assert fit.A == pytest.approx(TRUE_A, rel=0.25)
    for name, truth in (("E", TRUE_E), ("A", TRUE_A), ("alpha", TRUE_ALPHA)):
        lo, hi = fit.ci[name]
        assert lo <= truth <= hi, (name, fit.ci[name])
    # The MAD rule flags every corrupted evaluation, and at most one of the 46 clean ones.
    corrupted = set(evals.loc[OUTLIER_ROWS, "model"] + "@" + evals.loc[OUTLIER_ROWS, "step"].astype(str))
    assert corrupted <= set(fit.outliers) and len(set(fit.outliers) - corrupted) <= 1
    # An extrapolated budget: the law's band holds the truth, a new point's band is wider.
    budget = 1e13
    conf, pred = fit.predict(budget), fit.predict(budget, kind="prediction")
    truth = TRUE_E + TRUE_A * budget ** -TRUE_ALPHA
    assert bool(conf["extrapolated"].iloc[0])
    assert conf["lo"].iloc[0] <= truth <= conf["hi"].iloc[0]
    assert pred["hi"].iloc[0] - pred["lo"].iloc[0] > conf["hi"].iloc[0] - conf["lo"].iloc[0]
    assert "alpha = 0.50" in fit.summary()


def test_saturating_fit_on_the_paper_table_says_no_saturation(paper):
    fit = fit_saturating(paper.evals, n_boot=100)
    assert fit.converged and fit.on == "frontier" and fit.n == 8 and fit.n_evals == 12
    assert fit.alpha == pytest.approx(0.34, abs=0.03) and fit.intervals["alpha"].identified
    # E = 0 is the bound, not a measurement: reported as not identified, with how often.
    e = fit.intervals["E"]
    assert "E" in fit.at_bounds and fit.E == 0.0 and not e.identified and e.at_bound > 0.5
    assert "E     = 0  not identified (on its bound at 0 in" in fit.summary()


def test_frontier_is_the_lower_envelope_across_models():
    evals = pd.DataFrame({
        "trial": ["a", "a", "a", "b", "b", "b", "c"],
        "step": [1, 2, 3, 1, 2, 3, 1],
        "compute_gflops": [1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 3.0],
        FID: [100.0, 80.0, 75.0, 90.0, 60.0, 40.0, 75.0],
    })
    front = compute_frontier(evals)
    # (3, 75) from c ties a's (3, 75): not better, so only a's stays.
    assert list(zip(front["trial"], front["compute_gflops"], front[FID])) == [
        ("a", 1.0, 100.0), ("a", 2.0, 80.0), ("a", 3.0, 75.0), ("b", 4.0, 60.0), ("b", 6.0, 40.0)]
    best = frontier_at(front, [0.5, 1.0, 3.5, 10.0])
    assert np.isnan(best[0]) and list(best[1:]) == [100.0, 75.0, 40.0]


# ------------------------------------------------------------------------------------------
# A real sqlite MLflow store with the stable names
# ------------------------------------------------------------------------------------------

MODELS = {  # trial -> (model, patch, depth, hidden, heads, gflops, params)
    "DiT-S-8": ("DiT-S/8", 8, 12, 384, 6, 0.36, 33_000_000),
    "DiT-S-4": ("DiT-S/4", 4, 12, 384, 6, 1.41, 33_000_000),
    "DiT-B-4": ("DiT-B/4", 4, 12, 768, 12, 5.56, 130_000_000),
}
BATCH = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Study 'tiny': two finished trials with FID at steps 100 and 200, one RUNNING without FID.
    Study 'nofid': one running trial with loss only."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    ids = {}
    for study in ("tiny", "nofid"):
        exp = client.create_experiment(study, artifact_location=(root / "artifacts" / study).as_uri())
        parent = client.create_run(exp, tags={TAG_KIND: "study", TAG_STUDY: study}, run_name=study).info.run_id
        client.log_dict(parent, {"name": study, "grid": {"model": list(MODELS)}}, "spec/resolved.json")
        ids[study] = (exp, parent)
    exp, parent = ids["tiny"]
    for i, (trial, (model, patch, depth, hidden, heads, gflops, params)) in enumerate(MODELS.items()):
        tags = {TAG_STUDY: "tiny", TAG_TRIAL: trial, TAG_KIND: "trial", TAG_PARENT: parent,
                "eval.features": "inception-v3-tf", "eval.num_samples": "1000"}
        run = client.create_run(exp, tags=tags, run_name=trial).info.run_id
        values = {"model": model, "patch_size": patch, "depth": depth, "hidden_size": hidden,
                  "num_heads": heads, "block": "adaln-zero", "image_size": 256, "gflops": gflops,
                  "params": params, "global_batch": BATCH, "lr": 1e-4, "steps": 200, "zero_stage": 0,
                  "precision": "fp32"}
        last = 200 if i < 2 else 120  # the third is still running
        metrics = [Metric(LOSS, 1.0 / (1 + s / 50) + 0.01 * i, 1000 + s, s) for s in range(10, last + 1, 10)]
        if i < 2:
            metrics += [Metric(FID, 300.0 / (1 + i) / (s / 100), 1000 + s, s) for s in (100, 200)]
            metrics += [Metric("eval/precision", 0.5 + 0.1 * i, 1000 + s, s) for s in (100, 200)]
        if i == 1:  # the trainer's own compute history: twice the nominal images (e.g. a replayed epoch)
            metrics += [Metric("train/compute_gflops", 2 * gflops * 3 * BATCH * s, 1000 + s, s)
                        for s in range(10, 201, 10)]
        client.log_batch(run, metrics=metrics, params=[Param(k, str(v)) for k, v in values.items()])
        if i < 2:
            client.set_terminated(run, "FINISHED")
    exp, parent = ids["nofid"]
    run = client.create_run(exp, tags={TAG_STUDY: "nofid", TAG_TRIAL: "only", TAG_KIND: "trial", TAG_PARENT: parent},
                            run_name="only").info.run_id
    client.log_batch(run, metrics=[Metric(LOSS, 1.0 / s, 0, s) for s in range(1, 30)],
                     params=[Param(k, str(v)) for k, v in {"model": "DiT-S/2", "patch_size": 2, "depth": 12,
                                                            "hidden_size": 384, "gflops": 6.06,
                                                            "global_batch": 8}.items()])
    return SimpleNamespace(uri=uri, root=root, tiny=ids["tiny"][1], nofid=ids["nofid"][1])


def test_load_study_frames_from_mlflow_including_a_running_trial(store):
    data = load_study("tiny", store.uri)
    t = data.trials.set_index("trial")
    assert list(data.trials["trial"]) == ["DiT-S-8", "DiT-S-4", "DiT-B-4"]  # by Gflops
    assert t.loc["DiT-B-4", "status"] == "RUNNING" and t.loc["DiT-S-8", "status"] == "FINISHED"
    assert t.loc["DiT-B-4", "last_step"] == 120 and np.isnan(t.loc["DiT-B-4", "final_fid"])
    assert t.loc["DiT-S-8", "final_fid"] == pytest.approx(150.0) and t.loc["DiT-S-8", "final_fid_step"] == 200
    assert t.loc["DiT-S-8", "params"] == 33_000_000 and t.loc["DiT-S-8", "size"] == "S"
    assert t.loc["DiT-S-8", "final_loss"] == pytest.approx(1.0 / 5)
    # Compute: the paper's formula, or the trainer's own history when it logged one.
    assert t.loc["DiT-S-8", "compute_gflops"] == pytest.approx(0.36 * 3 * BATCH * 200)
    assert t.loc["DiT-S-4", "compute_gflops"] == pytest.approx(2 * 1.41 * 3 * BATCH * 200)
    ev = data.evals
    assert len(ev) == 4 and set(ev["trial"]) == {"DiT-S-8", "DiT-S-4"}
    assert {FID, "eval/precision"} <= set(ev.columns)
    row = ev[(ev["trial"] == "DiT-S-8") & (ev["step"] == 100)].iloc[0]
    assert row["compute_gflops"] == pytest.approx(0.36 * 3 * BATCH * 100) and row[FID] == pytest.approx(300.0)
    assert len(data.losses) == 20 + 20 + 12
    assert data.has_fid and data.parent_run_id == store.tiny and data.spec["name"] == "tiny"
    assert "inception-v3-tf" in data.protocol and "1000" in data.protocol
    by_id = load_study(store.tiny, store.uri)
    assert by_id.name == "tiny" and by_id.trials["trial"].tolist() == data.trials["trial"].tolist()


def test_unknown_study_and_missing_store_are_clear_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="no study named 'nope'.*nofid, tiny"):
        load_study("nope", store.uri)
    with pytest.raises(ConfigError, match="no MLflow tracking store"):
        load_study("tiny", f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "absent.db").exists()


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------


def _check_images(paths):
    assert {p.suffix for p in paths} == {".png", ".svg"}
    for p in paths:
        head = p.read_bytes()[:200]
        assert p.stat().st_size > 1000
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in p.read_bytes()[:2000]


def test_plots_of_a_study_and_of_the_paper(store, paper, tmp_path):
    from analysis.plots import (
        plot_fid_vs_compute,
        plot_fid_vs_gflops,
        plot_fid_vs_step,
        plot_loss_curves,
    )

    data = load_study("tiny", store.uri)
    fit = fit_fid_vs_gflops(paper.evals, n_boot=200)
    _check_images(plot_fid_vs_gflops(paper.evals, tmp_path / "paper_gflops", fit=fit))
    _check_images(plot_fid_vs_compute(data.evals, tmp_path / "compute", reference=paper.evals))
    step_paths = plot_fid_vs_step(data.evals, tmp_path / "steps")
    assert {p.name for p in step_paths} == {"steps_by_patch.png", "steps_by_patch.svg",
                                            "steps_by_size.png", "steps_by_size.svg"}
    _check_images(step_paths)
    _check_images(plot_loss_curves(data.losses, tmp_path / "loss"))


def test_plots_without_fid_draw_what_exists(store, tmp_path):
    from analysis.plots import (
        NO_FID,
        plot_fid_vs_compute,
        plot_fid_vs_gflops,
        plot_fid_vs_step,
        plot_study,
    )

    data = load_study("nofid", store.uri)
    assert not data.has_fid and any("no FID yet" in n for n in data.notes)
    assert plot_fid_vs_gflops(data.evals, tmp_path / "a") == []
    assert plot_fid_vs_compute(data.evals, tmp_path / "b") == []
    assert plot_fid_vs_step(data.evals, tmp_path / "c") == []
    plots = plot_study(data, tmp_path / "all")
    assert set(plots.paths) == {"loss_curves", "loss_vs_gflops"}
    assert any(NO_FID in n for n in plots.notes)
    for paths in plots.paths.values():
        _check_images(paths)


# ------------------------------------------------------------------------------------------
# Report and CLI
# ------------------------------------------------------------------------------------------


def test_report_html_is_self_contained_and_logged_to_the_parent_run(store, paper, tmp_path):
    from mlflow.tracking import MlflowClient

    from analysis.report import build_report, log_report, write_study_report

    data = load_study("tiny", store.uri)
    report = build_report(data, tmp_path / "r", published=paper, n_boot=100, n_boot_saturating=50)
    text = report.path.read_text()
    assert report.path.name == "report.html" and "<table" in text
    for needle in ("DiT-S/8", "DiT-B/4", "running", "inception-v3-tf", "Published: DiT paper (Table 4)",
                   "slope b", "r(log Gflops, FID)", "Compute-efficient frontier"):
        assert needle in text, needle
    written = {p.name for p in report.files}
    for name in ("fid_vs_gflops", "fid_vs_compute", "fid_vs_step_by_patch", "fid_vs_step_by_size",
                 "loss_curves", "loss_vs_gflops"):
        assert {f"{name}.png", f"{name}.svg"} <= written, name
    assert not [n for n in report.notes if "no FID" in n]
    images = text.split("data:image/png;base64,")[1:]
    assert len(images) == len([p for p in report.files if p.suffix == ".png"])
    assert base64.b64decode(images[0].split("'")[0])[:4] == b"\x89PNG"
    run_id = log_report(report, data)
    names = {a.path for a in MlflowClient(store.uri).list_artifacts(run_id, "report")}
    assert "report/report.html" in names and "report/plots" in names

    md = build_report(data, tmp_path / "m", fmt="md", n_boot=50, n_boot_saturating=20)
    assert "| model |" in md.path.read_text() and "](plots/fid_vs_gflops.png)" in md.path.read_text()

    # The `ditscale run` hook, on the study without FID: writes <root>/report/report.html.
    result = SimpleNamespace(name="nofid", root=tmp_path / "study", tracking_uri=store.uri,
                             parent_run_id=store.nofid)
    path = write_study_report(result, n_boot=50, n_boot_saturating=20)
    assert path == tmp_path / "study" / "report" / "report.html"
    assert "no FID yet" in path.read_text() and "data:image/png;base64," in path.read_text()
    assert any(a.path == "report/report.html" for a in MlflowClient(store.uri).list_artifacts(store.nofid, "report"))


def test_cli_report_paper_only_and_unknown_study(store, tmp_path, capsys):
    from orchestrator.cli import main

    out = tmp_path / "paper"
    assert main(["report", "--published", str(paper_table_path()), "--out", str(out), "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    assert "-0.9298" in printed and (out / "report.html").is_file()
    assert main(["report", "--published", "paper", "--out", str(tmp_path / "md"), "--format", "md",
                 "--n-boot", "50"]) == 0
    assert (tmp_path / "md" / "report.md").is_file()
    assert main(["report", "nope", "--tracking-uri", store.uri, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and "tiny" in err
    assert main(["report"]) == 2
    assert "--published" in capsys.readouterr().err
