"""Faults 1, 3, 5 and 8 against the real engines: local Ray, DeepSpeed on gloo, MLflow."""

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from faults.injectors import KillAt
from orchestrator.study import run_study
from analysis.schema import TAG_KIND, TAG_REASON, TAG_TRIAL
from orchestrator.tracking import MLflowSink, StudyTracker
from orchestrator.spec.trial import TrialConfig
from orchestrator.trial import run_trial

TINY = {"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()


def spec_file(tmp_path, manifest, name, steps=16, lr=(1e-3,), tracking=None):
    spec = {
        "name": name,
        "data": {"manifest": manifest},
        "grid": {"size": [TINY], "patch": [4], "recipe": {"lr": list(lr)}},
        "recipe": {"steps": steps, "global_batch": 32, "zero_stage": 2, "checkpoint_every": 4, "log_every": 2,
                   "shuffle_buffer": 128},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 1},
        "storage": str(tmp_path / "runs"),
    }
    if tracking:
        spec["tracking"] = {"uri": tracking}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trial_runs(uri, study):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(study)
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_KIND) == "trial"]
    return c, {r.data.tags[TAG_TRIAL]: r for r in runs}


def test_1_sigkilled_worker_resumes_every_step_once_in_mlflow_and_same_final_weights(digits8, tmp_path):
    def cfg(name):
        recipe = dict(model={k: v for k, v in TINY.items() if k != "name"} | {"patch_size": 2}, data=digits8,
                      steps=16, global_batch=32, lr=1e-3, log_every=2, checkpoint_every=6, zero_stage=2,
                      shuffle_buffer=128, ema_decay=0.9)
        return TrialConfig(name=name, storage=str(tmp_path / "runs"), workers=2, cpus_per_worker=0.5,
                           max_failures=2, train=recipe)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StudyTracker(uri, "faults", None, None)
    run_id = tracker.trial_run("killed", {}, {}, None)
    marker = tmp_path / "killed.marker"
    killed = run_trial(cfg("killed"), sinks=[MLflowSink(uri, run_id)],
                       step_callbacks=[KillAt(9, marker, rank=1)])
    clean = run_trial(cfg("clean"))
    assert marker.exists() and killed.status == clean.status == "finished"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")]
    assert steps == list(range(2, 17, 2))  # replayed steps 7..9 were not logged twice
    a = torch.load(Path(killed.checkpoint) / "ema.pt", weights_only=True)
    b = torch.load(Path(clean.checkpoint) / "ema.pt", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_3_mlflow_server_down_mid_trial_loses_nothing(digits8, tmp_path, mlflow_server):
    spec = spec_file(tmp_path, digits8, "outage", steps=80, tracking=mlflow_server.uri)
    trials = tmp_path / "runs" / "outage" / "trials"
    events = []

    def outage():
        deadline = time.time() + 300
        while time.time() < deadline:
            logs = list(trials.glob("*/metrics.jsonl"))
            if logs and len(logs[0].read_text().splitlines()) >= 3:
                mlflow_server.stop()
                events.append(("down", time.time()))
                time.sleep(8)
                mlflow_server.start()
                events.append(("up", time.time()))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=outage)
    thread.start()
    result = run_study(spec)
    thread.join()
    assert [e for e, _ in events] == ["down", "up"], "the outage was never staged"
    assert result.ok
    c, runs = trial_runs(mlflow_server.uri, "outage")
    (run,) = runs.values()
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/images_per_s", "train/compute_gflops"):
        steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(2, 81, 2)), (key, steps)  # all there, none twice


def test_5_nan_fails_its_cell_with_reason_and_step_while_others_finish(digits8, tmp_path):
    spec = spec_file(tmp_path, digits8, "nan", steps=12, lr=(1e-3, 1e9))
    result = run_study(spec)
    assert not result.ok
    statuses = {cell: o["status"] for cell, o in result.outcomes.items()}
    ok_cell = next(c for c in statuses if "lr1e-3" in c or "lr0.001" in c)
    bad_cell = next(c for c in statuses if c != ok_cell)
    assert statuses == {ok_cell: "finished", bad_cell: "failed"}
    reason = result.outcomes[bad_cell]["reason"]
    assert reason.startswith("non-finite loss") and "at step" in reason
    c, runs = trial_runs(result.tracking_uri, "nan")
    assert runs[bad_cell].info.status == "FAILED" and runs[bad_cell].data.tags[TAG_REASON] == reason
    assert runs[ok_cell].info.status == "FINISHED"


def _log_many(uri: str, study: str, trial: str, n: int) -> int:
    from orchestrator.tracking import MLflowSink, StudyTracker

    tracker = StudyTracker(uri, study, None, None)
    run_id = tracker.trial_run(trial, {"model": trial}, {}, None)
    sink = MLflowSink(uri, run_id)
    for step in range(1, n + 1):
        sink.add({"step": step, "train/loss": 1.0 / step, "train/images_per_s": float(step)})
    assert sink.flush()
    tracker.finish_trial(run_id, "finished")
    return n


def test_8_many_trials_logging_to_one_sqlite_file_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    StudyTracker(uri, "busy", None, None)  # create the schema once, as the study driver does
    with mp.get_context("spawn").Pool(8) as pool:
        done = pool.starmap(_log_many, [(uri, "busy", f"t{i}", 60) for i in range(8)])
    assert done == [60] * 8
    c, runs = trial_runs(uri, "busy")
    assert len(runs) == 8
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 61))
