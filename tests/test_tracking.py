"""MLflow naming, run reuse, and metric delivery across an outage (real sqlite store / server)."""

import time

import pytest

from dit.errors import ConfigError
from analysis.schema import TAG_PARENT, TAG_STUDY, TAG_TRIAL
from orchestrator.tracking import MLflowSink, StudyTracker, check_reachable, client, resolve_tracking_uri


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
