"""MLflow naming, run reuse, and metric delivery across an outage (real sqlite store / server)."""

import json
import os
import time

import pytest
import yaml

from dit.errors import ConfigError
from analysis.schema import TAG_PARENT, TAG_STUDY, TAG_TRIAL
from analysis.store import FORWARDED_ENV, is_server, mlflow_env, redact_json, redact_uri
from orchestrator.tracking import MLflowSink, StudyTracker, check_reachable, client, resolve_tracking_uri

SECRET = "s3cr3t-Pa55w0rd"


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, None, tmp_path / "s") == f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri(None, "http://spec:5000", tmp_path) == "http://spec:5000"
    assert resolve_tracking_uri("http://cli:5000", "http://spec:5000", tmp_path) == "http://cli:5000"


def test_parent_and_child_runs_are_created_once_and_found_again(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = StudyTracker(uri, "demo", None, tmp_path / "artifacts")
    id_file = tmp_path / "trials" / "cell-a" / "mlflow_run_id"
    run_a = first.trial_run("cell-a", {"model": "DiT-S/2", "gflops": 6.06}, {"eval.features": "x"}, id_file)
    again = StudyTracker(uri, "demo", None, tmp_path / "artifacts")
    assert (again.experiment_id, again.parent_id) == (first.experiment_id, first.parent_id)
    assert again.trial_run("cell-a", {}, {}, id_file) == run_a  # from the run-id file
    id_file.unlink()
    assert again.trial_run("cell-a", {}, {}, id_file) == run_a  # found by its tags
    run = client(uri).get_run(run_a)
    assert run.data.tags[TAG_STUDY] == "demo" and run.data.tags[TAG_TRIAL] == "cell-a"
    assert run.data.tags[TAG_PARENT] == first.parent_id
    assert run.data.params == {"model": "DiT-S/2", "gflops": "6.06"}
    assert len(again.trial_runs()) == 1
    again.finish_trial(run_a, "failed", "non-finite loss (nan) at step 4")
    run = client(uri).get_run(run_a)
    assert run.info.status == "FAILED" and "step 4" in run.data.tags["ditscale.failure_reason"]


def test_sink_logs_each_metric_with_its_step(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StudyTracker(uri, "s", None, None)
    run_id = tracker.trial_run("c", {}, {}, None)
    sink = MLflowSink(uri, run_id)
    for step in (10, 20):
        sink.add({"step": step, "train/loss": 1.0 / step, "train/images_per_s": 5.0})
    history = client(uri).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05)]
    assert "step" not in client(uri).get_run(run_id).data.metrics


def test_unreachable_server_is_refused_with_a_clear_message():
    t0 = time.time()
    with pytest.raises(ConfigError, match="not reachable.*start the server"):
        check_reachable("http://127.0.0.1:9")  # discard port: nothing listens
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_real_server_outage_buffers_then_delivers_everything(tmp_path, mlflow_server):
    uri = mlflow_server.uri
    check_reachable(uri)
    tracker = StudyTracker(uri, "outage", None, None)
    run_id = tracker.trial_run("c", {"model": "DiT-S/8"}, {}, None)
    sink = MLflowSink(uri, run_id)
    sink.add({"step": 1, "train/loss": 1.0})
    mlflow_server.stop()
    for step in (2, 3, 4):
        sink.add({"step": step, "train/loss": 1.0 / step})  # must not raise
    assert len(sink.pending) == 3
    mlflow_server.start()
    assert sink.flush()
    history = client(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


@pytest.mark.parametrize("uri, shown", [
    (f"http://user:{SECRET}@mlflow.internal:5000", "http://user:***@mlflow.internal:5000"),
    (f"https://:{SECRET}@h/p", "https://:***@h/p"),
    (f"http://u:{SECRET}@x@h:5000/a", "http://u:***@h:5000/a"),  # an unescaped '@' in the password
    (f"https://h/a?x=1&token={SECRET}&access_key={SECRET}#f", "https://h/a?x=1&token=***&access_key=***#f"),
    (f"s3://b/k?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}",
     "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
    (f"tracking: {{uri: 'http://u:{SECRET}@h'}}  # a YAML line", "tracking: {uri: 'http://u:***@h'}  # a YAML line"),
    ("sqlite:////runs/demo/mlflow.db", "sqlite:////runs/demo/mlflow.db"),
    ("http://user@h:5000/?page=2", "http://user@h:5000/?page=2"),
])
def test_redact_uri_hides_passwords_and_tokens_only(uri, shown):
    assert redact_uri(uri) == shown


def test_redact_json_redacts_every_string_and_leaves_the_original():
    resolved = {"spec": {"tracking": {"uri": f"http://u:{SECRET}@h"}}, "cells": [{"data": f"s3://b?sig={SECRET}"}],
                "steps": 4}
    safe = redact_json(resolved)
    assert SECRET not in json.dumps(safe) and safe["steps"] == 4
    assert resolved["spec"]["tracking"]["uri"] == f"http://u:{SECRET}@h"


def test_server_uris_are_told_from_stores_opened_directly():
    assert all(map(is_server, ["http://h:5000", "https://h", "databricks", "databricks://profile"]))
    assert not any(map(is_server, ["sqlite:////a/mlflow.db", "/a/mlruns", "file:///a/mlruns", "mlruns",
                                   "postgresql+psycopg2://u:p@h/db"]))


def test_mlflow_env_forwards_what_reaches_the_server_and_nothing_else(monkeypatch):
    wanted = {"MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": SECRET, "MLFLOW_TRACKING_TOKEN": "t",
              "MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca.pem",
              "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/me.pem", "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
              "MLFLOW_TRACKING_URI": "http://env:5000", "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK",
              "AWS_SESSION_TOKEN": "ST", "AWS_DEFAULT_REGION": "us-west-2"}
    unwanted = {"MLFLOW_RUN_ID": "r", "MLFLOW_EXPERIMENT_ID": "7", "MLFLOW_EXPERIMENT_NAME": "x", "HOME_AWS": "x"}
    for name in [n for n in os.environ if n in FORWARDED_ENV or n.startswith("AWS_")]:
        monkeypatch.delenv(name)  # only what this test sets
    for name, value in {**wanted, **unwanted}.items():
        monkeypatch.setenv(name, value)
    assert mlflow_env() == wanted
    assert mlflow_env("http://study:5000") == {**wanted, "MLFLOW_TRACKING_URI": "http://study:5000"}


def test_study_files_are_logged_without_secrets_and_stay_in_the_folder_of_a_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StudyTracker(uri, "s", None, tmp_path / "artifacts")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "tracking": {"uri": f"http://u:{SECRET}@h:5000"}}))
    resolved = {"spec": {"tracking": {"uri": f"http://u:{SECRET}@h:5000"}}}
    tracker.log_study_files(spec, resolved, [{"cell": "c"}])
    assert client(uri).get_experiment(tracker.experiment_id).artifact_location == (tmp_path / "artifacts").as_uri()
    logged = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert {p.name for p in logged} == {"s.yaml", "resolved.json", "cells.json"}
    assert [p for p in logged if SECRET in p.read_text()] == []
    assert "u:***@h:5000" in next(p for p in logged if p.name == "s.yaml").read_text()


def test_an_unreachable_server_is_named_without_its_password():
    with pytest.raises(ConfigError) as refused:
        check_reachable(f"http://ditscale:{SECRET}@127.0.0.1:9")  # the discard port: nothing answers
    assert SECRET not in str(refused.value) and "ditscale:***@127.0.0.1:9" in str(refused.value)


def test_a_report_shows_no_password_even_from_a_spec_logged_before_redaction(tmp_path):
    from analysis.report import build_report
    from analysis.runs import load_published

    data = load_published(None)
    data.spec = {"spec": {"tracking": {"uri": f"http://u:{SECRET}@h:5000"}}}  # an old study's resolved.json
    report = build_report(data, tmp_path, n_boot=0, n_boot_saturating=0)
    text = report.path.read_text()
    assert SECRET not in text and "u:***@h:5000" in text
