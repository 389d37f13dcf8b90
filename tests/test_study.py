"""Whole studies on a real local Ray and a real MLflow (sqlite file and `mlflow server` over HTTP)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main as cli
from analysis.schema import TAG_KIND, TAG_PARENT, TAG_STUDY, TAG_TRIAL

TRIAL_PARAMS = {"model", "patch_size", "depth", "hidden_size", "num_heads", "block", "image_size", "gflops",
                "params", "global_batch", "lr", "steps", "zero_stage", "precision"}


def write_spec(tmp_path, manifest, name="mini", steps=8, **extra):
    spec = {
        "name": name,
        "data": {"manifest": manifest},
        "grid": {"size": [{"name": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2, 4]},
        "recipe": {"steps": steps, "global_batch": 32, "lr": 1e-3, "zero_stage": 2, "checkpoint_every": 4,
                   "log_every": 2, "shuffle_buffer": 128, "ema_decay": 0.9},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_failures": 1},
        "storage": str(tmp_path / "runs"),
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def children(uri, study):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(study)
    return c, [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_KIND) == "trial"]


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_study_runs_every_cell_and_logs_to_a_real_mlflow_server(tmp_path, digits8, mlflow_server):
    spec = write_spec(tmp_path, digits8)
    assert cli(["run", str(spec), "--tracking-uri", mlflow_server.uri, "--no-report"]) == 0
    c, runs = children(mlflow_server.uri, "mini")
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == ["DiT-tiny-2", "DiT-tiny-4"]
    parent = next(r for r in c.search_runs([runs[0].info.experiment_id]) if r.data.tags.get(TAG_KIND) == "study")
    assert parent.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"spec", "cells.json"}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_PARENT] == parent.info.run_id and run.data.tags[TAG_STUDY] == "mini"
        assert TRIAL_PARAMS <= set(run.data.params)
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [2, 4, 6, 8]
        assert {"train/grad_norm", "train/images_per_s", "train/tflops_per_s", "train/compute_gflops"} <= set(run.data.metrics)
        gflops = float(run.data.params["gflops"])
        assert run.data.metrics["train/compute_gflops"] == pytest.approx(gflops * 3 * 32 * 8, rel=1e-5)


def start_driver(spec: Path, log: Path, *args: str) -> subprocess.Popen:
    """`ditscale ARGS SPEC` in its own process group (so a kill takes its local Ray too), output to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, str(spec), "--no-report"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(proc: subprocess.Popen, log: Path, ready, timeout: float, what: str) -> None:
    """Poll ``ready()``; fail with the driver's output if it exits or the time runs out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-6000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {what} within {timeout:.0f} s; the driver's output:\n{log.read_text()[-6000:]}")


@pytest.mark.slow
def test_killed_driver_then_resume_finishes_without_rerunning_or_duplicating(tmp_path, digits8, capsys):
    # One cell at a time, so the kill point (one cell ended, the next one part way) always comes.
    spec = write_spec(tmp_path, digits8, name="killme", steps=24)
    raw = yaml.safe_load(spec.read_text())
    raw["resources"]["max_concurrent_trials"] = 1
    spec.write_text(yaml.safe_dump(raw))
    root = tmp_path / "runs" / "killme"
    log = tmp_path / "driver.log"
    proc = start_driver(spec, log, "run")

    def kill_point() -> bool:
        ended = list(root.glob("trials/*/outcome.json"))
        logs = [p for p in root.glob("trials/*/metrics.jsonl") if not (p.parent / "outcome.json").exists()]
        return bool(ended) and any(len(p.read_text().splitlines()) >= 4 for p in logs)

    def holds_lock() -> bool:
        lock = root / "driver.lock"
        return lock.is_file() and f'"pid": {proc.pid}' in lock.read_text()

    # While the first driver runs, a second one on the same study is refused, naming it.
    wait_until(proc, log, holds_lock, 300, "the driver took the study's lock")
    assert cli(["resume", str(spec), "--no-report"]) == 2
    assert f"pid {proc.pid}" in capsys.readouterr().err
    wait_until(proc, log, kill_point, 600, "the kill point (one cell ended, another at step 8)")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ended = {p.parent.name: (p.read_text(), p.stat().st_ino, p.stat().st_mtime_ns)
             for p in root.glob("trials/*/outcome.json")}
    ended_metrics = {n: (root / "trials" / n / "metrics.jsonl").read_text() for n in ended}
    time.sleep(2)

    assert cli(["status", str(spec)]) == 0
    assert cli(["resume", str(spec), "--no-report"]) == 0  # takes over the dead driver's lock
    for name, (text, inode, mtime) in ended.items():  # ended cells were skipped, not rerun
        outcome = root / "trials" / name / "outcome.json"
        assert (outcome.read_text(), outcome.stat().st_ino, outcome.stat().st_mtime_ns) == (text, inode, mtime)
        assert (root / "trials" / name / "metrics.jsonl").read_text() == ended_metrics[name]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c, runs = children(uri, "killme")
    assert len(runs) == 2  # no duplicated child runs
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(2, 25, 2)), steps  # every step exactly once
        outcome = json.loads((root / "trials" / run.data.tags[TAG_TRIAL] / "outcome.json").read_text())
        assert outcome["status"] == "finished" and outcome["step"] == 24
    # A finished study runs again, and resumes, as a no-op.
    assert cli(["run", str(spec), "--no-report"]) == 0
    assert cli(["resume", str(spec), "--no-report"]) == 0
    assert "already ended" in capsys.readouterr().out
    # The report from the spec, as status and resume take it: into the study folder.
    assert cli(["report", str(spec), "--n-boot", "20", "--no-log"]) == 0
    assert (root / "report" / "report.html").is_file()


def test_bad_spec_exits_2_and_starts_nothing(tmp_path, digits8, capsys):
    spec = write_spec(tmp_path, digits8)
    raw = yaml.safe_load(spec.read_text())
    raw["recipe"]["zero_stage"] = 5
    spec.write_text(yaml.safe_dump(raw))
    assert cli(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "recipe.zero_stage" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_missing_data_and_dead_tracking_server_refuse_before_anything_starts(tmp_path, digits8, capsys):
    spec = write_spec(tmp_path, str(tmp_path / "nowhere" / "manifest.json"))
    assert cli(["run", str(spec)]) == 2
    assert "manifest" in capsys.readouterr().err
    spec = write_spec(tmp_path, digits8)
    assert cli(["run", str(spec), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "not reachable" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mini" / "study.json").exists()


def test_resume_of_a_study_that_never_ran_is_refused(tmp_path, digits8, capsys):
    spec = write_spec(tmp_path, digits8)
    assert cli(["resume", str(spec)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_cancel_stops_a_running_study_and_resume_finishes_it(tmp_path, digits8):
    spec = write_spec(tmp_path, digits8, name="cancelme", steps=400)
    raw = yaml.safe_load(spec.read_text())
    raw["recipe"].update(checkpoint_every=100, log_every=10)  # a long run, few checkpoints
    spec.write_text(yaml.safe_dump(raw))
    root = tmp_path / "runs" / "cancelme"
    log = tmp_path / "driver.log"
    proc = start_driver(spec, log, "run")
    wait_until(proc, log, lambda: any(len(p.read_text().splitlines()) >= 2 for p in root.glob("trials/*/metrics.jsonl")),
               300, "two logged steps")
    assert cli(["cancel", str(spec)]) == 0
    proc.wait(timeout=300)
    out = log.read_text()
    assert proc.returncode == 1 and "study cancelme: cancelled" in out, out[-6000:]
    assert not all((root / "trials" / c / "outcome.json").exists() for c in ("DiT-tiny-2", "DiT-tiny-4"))
    c, runs = children(f"sqlite:///{root / 'mlflow.db'}", "cancelme")
    parent = next(r for r in c.search_runs([runs[0].info.experiment_id]) if r.data.tags.get(TAG_KIND) == "study")
    assert parent.info.status == "KILLED"
    assert cli(["resume", str(spec), "--no-report"]) == 0
    assert all(json.loads((root / "trials" / c / "outcome.json").read_text())["step"] == 400
               for c in ("DiT-tiny-2", "DiT-tiny-4"))
