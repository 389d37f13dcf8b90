"""MLflow names and runs: one experiment per study, a parent run per study, a child per trial.

Writers: the study driver (parent run) and each trial's Ray Train controller (its child
run, through ``MLflowSink``). Workers never talk to MLflow. Every write goes through
``_retry`` so a tracking server that is briefly down or a busy sqlite file delays
logging instead of losing it; metrics that still cannot be sent stay buffered in the sink
and go out with the next batch.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from dit.errors import ConfigError

T = TypeVar("T")

TAG_STUDY = "ditscale.study"
TAG_TRIAL = "ditscale.trial"
TAG_KIND = "ditscale.kind"
TAG_PARENT = "mlflow.parentRunId"
TAG_REASON = "ditscale.failure_reason"
RUN_ID_FILE = "mlflow_run_id"

# Params every trial run carries (DESIGN.md); users script against these names.
TRIAL_PARAMS = (
    "model", "patch_size", "depth", "hidden_size", "num_heads", "block", "image_size", "gflops",
    "params", "global_batch", "lr", "steps", "zero_stage", "precision",
)


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None, study_dir: Path) -> str:
    """--tracking-uri, then the spec, then MLFLOW_TRACKING_URI, else sqlite in the study folder."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    study_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(study_dir / 'mlflow.db').resolve()}"


def _quiet_http() -> None:
    # Fail fast on an unreachable server: our own retry loop decides how long to wait.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_http()
    return MlflowClient(tracking_uri=uri)


def _retry(fn: Callable[[], T], *, attempts: int = 8, first_wait: float = 0.5, what: str = "MLflow") -> T:
    """Call fn, retrying transient failures (server down, sqlite busy) with backoff."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException, requests/sqlalchemy errors
            if attempt == attempts - 1 or not _transient(err):
                raise
            time.sleep(wait)
            wait = min(wait * 2, 10.0)
    raise AssertionError("unreachable")


def _transient(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(
        s in text
        for s in ("locked", "connection", "timed out", "timeout", "503", "502", "504", "max retries",
                  "temporarily", "refused", "busy", "reset by peer")
    )


def check_reachable(uri: str) -> None:
    """Refuse to start a study against a tracking store that does not answer."""
    try:
        _retry(lambda: client(uri).search_experiments(max_results=1), attempts=3, first_wait=1.0)
    except Exception as err:
        raise ConfigError(
            f"MLflow tracking store {uri!r} is not reachable ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); start the server or pass another --tracking-uri"
        ) from None


def versions() -> dict[str, str]:
    tags = {"ditscale.python": platform.python_version()}
    for pkg in ("ditscale", "torch", "ray", "deepspeed", "mlflow"):
        try:
            from importlib.metadata import version

            tags[f"ditscale.version.{pkg}"] = version(pkg)
        except Exception:
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


class StudyTracker:
    """The study's experiment and parent run, created once and found again on resume."""

    def __init__(self, uri: str, study: str, experiment: str | None, artifact_root: Path | None):
        self.uri, self.study = uri, study
        self.client = client(uri)
        self.experiment_id = self._experiment(experiment or study, artifact_root)
        self.parent_id = self._parent_run()

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        exp = _retry(lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it or rename the study")
            return exp.experiment_id
        location = artifact_root.resolve().as_uri() if artifact_root else None
        return _retry(lambda: self.client.create_experiment(name, artifact_location=location))

    def _find(self, filter_string: str):
        runs = _retry(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=filter_string, max_results=10,
                order_by=["attributes.start_time ASC"],
            )
        )
        return runs[0] if runs else None

    def _parent_run(self) -> str:
        found = self._find(f"tags.`{TAG_KIND}` = 'study' and tags.`{TAG_STUDY}` = '{self.study}'")
        if found is not None:
            return found.info.run_id
        tags = {TAG_KIND: "study", TAG_STUDY: self.study, "mlflow.runName": self.study, **versions()}
        run = _retry(lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=self.study))
        return run.info.run_id

    def log_study_files(self, spec_path: Path | None, resolved: dict[str, Any], cells_table: list[dict]) -> None:
        if spec_path is not None:
            _retry(lambda: self.client.log_artifact(self.parent_id, str(spec_path), "spec"))
        _retry(lambda: self.client.log_dict(self.parent_id, resolved, "spec/resolved.json"))
        _retry(lambda: self.client.log_dict(self.parent_id, {"cells": cells_table}, "cells.json"))

    def trial_run(self, trial: str, params: dict[str, Any], tags: dict[str, str], id_file: Path | None) -> str:
        """The child run of a trial: the one recorded in its folder, else found by tag, else new."""
        run_id = id_file.read_text().strip() if id_file and id_file.is_file() else None
        if run_id is None:
            found = self._find(
                f"tags.`{TAG_STUDY}` = '{self.study}' and tags.`{TAG_TRIAL}` = '{trial}'"
            )
            run_id = found.info.run_id if found else None
        if run_id is None:
            all_tags = {TAG_STUDY: self.study, TAG_TRIAL: trial, TAG_PARENT: self.parent_id,
                        TAG_KIND: "trial", **tags}
            run = _retry(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=trial))
            run_id = run.info.run_id
            log_params(self.client, run_id, params)
        else:
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        if id_file is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        return run_id

    def finish_trial(self, run_id: str, status: str, reason: str | None = None) -> None:
        if reason:
            _retry(lambda: self.client.set_tag(run_id, TAG_REASON, reason[:5000]))
        _retry(lambda: self.client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED"))

    def finish_study(self, status: str) -> None:
        _retry(lambda: self.client.set_terminated(self.parent_id, status))

    def trial_runs(self) -> list[Any]:
        return _retry(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TAG_STUDY}` = '{self.study}' and "
                f"tags.`{TAG_KIND}` = 'trial'", max_results=10000,
            )
        )


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_text(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        _retry(lambda: mlflow_client.log_batch(run_id, params=items[i : i + 100]))


def _param_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)[:6000]
    return str(value)[:6000]


class MLflowSink:
    """Logs each step's metrics to a trial's run; buffers and retries when MLflow is down.

    Lives in the trial's Ray Train controller (it is pickled there), so the client is made
    lazily. ``add`` never raises: metrics that cannot be sent wait for the next call and
    ``flush``, which the driver calls at the end with a longer patience.
    """

    # After a failed send, later ``add`` calls only queue for this long, so an outage costs
    # training one short stall per interval instead of one per report.
    BACKOFF_S = 5.0

    def __init__(self, uri: str, run_id: str, prefix_skip: Iterable[str] = ("step",)):
        self.uri, self.run_id = uri, run_id
        self.skip = set(prefix_skip)
        self.pending: list[Any] = []
        self._client = None
        self._next_try = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def add(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(metrics["step"])
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if key not in self.skip and isinstance(value, (int, float)):
                self.pending.append(Metric(key, float(value), now, step))
        if time.monotonic() >= self._next_try and not self.flush(attempts=2):
            self._next_try = time.monotonic() + self.BACKOFF_S

    def flush(self, attempts: int = 30) -> bool:
        """Send what is pending; True when nothing is left."""
        if self._client is None:
            self._client = client(self.uri)
        while self.pending:
            batch = self.pending[:1000]
            try:
                _retry(lambda: self._client.log_batch(self.run_id, metrics=batch), attempts=attempts)
            except Exception:
                return False
            del self.pending[: len(batch)]
        self._next_try = 0.0
        return True
