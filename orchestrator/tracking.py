"""MLflow writes: one experiment per study, a parent run per study, a child per trial.

Writers: the study driver (parent run, ``StudyTracker``) and each trial's Ray Train controller
(its child run, through ``MLflowSink`` and ``SampleGridSink``). Workers never talk to MLflow.
Every write goes through :func:`retry` so a tracking server that is briefly down or a busy
sqlite file delays logging instead of losing it; metrics that still cannot be sent stay
buffered in the sink and go out with the next batch. The names written (tags, params,
metrics, artifact paths) are ``analysis.schema``'s; the client is ``analysis.store``'s.

With a tracking server, artifacts (spec, sample grids, report) go to the server's artifact store
(``mlflow server --serve-artifacts``), so a teammate on another machine sees them; with a store
opened directly (sqlite, a folder) they stay in the study folder. Whatever is logged or printed
has its URIs' passwords replaced by ``***`` (``analysis.store.redact_uri``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from analysis import store
from analysis.schema import (
    CELLS_ARTIFACT,
    FID,
    KIND_STUDY,
    KIND_TRIAL,
    LOSS,
    RESOLVED_SPEC_ARTIFACT,
    SAMPLES_ARTIFACT_DIR,
    SPEC_ARTIFACT_DIR,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_PARENT,
    TAG_PYTHON,
    TAG_REASON,
    TAG_RUN_NAME,
    TAG_STUDY,
    TAG_TRIAL,
    TAG_VERSION_PREFIX,
)
from dit.errors import ConfigError
from dit.files import atomic_write_text
from orchestrator.layout import MLFLOW_DB

T = TypeVar("T")
RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # what MLflow's stores hand out


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None, study_dir: Path) -> str:
    """--tracking-uri, then the spec, then MLFLOW_TRACKING_URI, else sqlite in the study folder."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    study_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(study_dir / MLFLOW_DB).resolve()}"


def client(uri: str):
    """An MlflowClient that fails fast on an unreachable server (``analysis.store``): our own
    retry loop decides how long to wait."""
    return store.client(uri)


def retry(fn: Callable[[], T], *, attempts: int = 8, first_wait: float = 0.5, what: str = "MLflow") -> T:
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
        retry(lambda: client(uri).search_experiments(max_results=1), attempts=3, first_wait=1.0)
    except Exception as err:
        # MLflow's message repeats the URL it called, password included.
        why = store.redact_uri(str(err).splitlines()[0][:200])
        raise ConfigError(
            f"MLflow tracking store {store.redact_uri(uri)!r} is not reachable ({type(err).__name__}: "
            f"{why}); start the server or pass another --tracking-uri"
        ) from None


def versions() -> dict[str, str]:
    tags = {TAG_PYTHON: platform.python_version()}
    for pkg in ("ditscale", "torch", "ray", "deepspeed", "mlflow"):
        try:
            from importlib.metadata import version

            tags[f"{TAG_VERSION_PREFIX}{pkg}"] = version(pkg)
        except Exception:
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if commit.returncode == 0:
            tags[TAG_GIT_COMMIT] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


def _artifact_location(uri: str, artifact_root: Path | None) -> str | None:
    """Where a new experiment keeps its artifacts: None (the server's own artifact store) for a
    tracking server, so what the driver and trial controllers log reaches everyone who reads the
    server; else the study folder, beside the sqlite file or folder store."""
    if artifact_root is None or store.is_server(uri):
        return None
    return artifact_root.resolve().as_uri()


class StudyTracker:
    """The study's experiment and parent run, created once and found again on resume."""

    def __init__(self, uri: str, study: str, experiment: str | None, artifact_root: Path | None):
        self.uri, self.study = uri, study
        self.client = client(uri)
        self.experiment_id = self._experiment(experiment or study, artifact_root)
        self.parent_id = self._parent_run()

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        exp = retry(lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it or rename the study")
            self._warn_if_local(name, exp.artifact_location)
            return exp.experiment_id
        location = _artifact_location(self.uri, artifact_root)
        return retry(lambda: self.client.create_experiment(name, artifact_location=location))

    def _warn_if_local(self, name: str, location: str) -> None:
        """An experiment made before artifacts went to the server keeps them on one machine."""
        if store.is_server(self.uri) and location.startswith("file:"):
            print(f"warning: MLflow experiment {name!r} keeps its artifacts in {location}, outside the "
                  "tracking server: other machines will not see them (use a new experiment name to fix)",
                  file=sys.stderr)

    def _find(self, filter_string: str):
        runs = retry(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=filter_string, max_results=10,
                order_by=["attributes.start_time ASC"],
            )
        )
        return runs[0] if runs else None

    def _parent_run(self) -> str:
        found = self._find(f"tags.`{TAG_KIND}` = '{KIND_STUDY}' and tags.`{TAG_STUDY}` = '{self.study}'")
        if found is not None:
            return found.info.run_id
        tags = {TAG_KIND: KIND_STUDY, TAG_STUDY: self.study, TAG_RUN_NAME: self.study, **versions()}
        run = retry(lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=self.study))
        return run.info.run_id

    def log_study_files(self, spec_path: Path | None, resolved: dict[str, Any], cells_table: list[dict]) -> None:
        """The spec as written, the resolved spec and the cell table, on the parent run; URIs in
        the specs lose their passwords first (``tracking.uri`` may be ``http://user:secret@...``)."""
        if spec_path is not None:
            text = store.redact_uri(Path(spec_path).read_text())
            name = f"{SPEC_ARTIFACT_DIR}/{Path(spec_path).name}"
            retry(lambda: self.client.log_text(self.parent_id, text, name))
        safe = store.redact_json(resolved)
        retry(lambda: self.client.log_dict(self.parent_id, safe, RESOLVED_SPEC_ARTIFACT))
        retry(lambda: self.client.log_dict(self.parent_id, {"cells": cells_table}, CELLS_ARTIFACT))

    def trial_run(self, trial: str, params: dict[str, Any], tags: dict[str, str], id_file: Path | None) -> str:
        """The child run of a trial: the one recorded in its folder, else found by tag, else new.

        A record that is empty, garbled or names a run this store does not have (a crash while
        it was written, a copied folder) is ignored and rewritten, never fatal.
        """
        run_id = self._recorded_run(id_file)
        if run_id is None:
            found = self._find(
                f"tags.`{TAG_STUDY}` = '{self.study}' and tags.`{TAG_TRIAL}` = '{trial}'"
            )
            run_id = found.info.run_id if found else None
        if run_id is None:
            all_tags = {TAG_STUDY: self.study, TAG_TRIAL: trial, TAG_PARENT: self.parent_id,
                        TAG_KIND: KIND_TRIAL, **tags}
            run = retry(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=trial))
            run_id = run.info.run_id
            log_params(self.client, run_id, params)
        else:
            retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        if id_file is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(id_file, run_id)
        return run_id

    def _recorded_run(self, id_file: Path | None) -> str | None:
        if id_file is None or not id_file.is_file():
            return None
        text = id_file.read_bytes().decode(errors="replace").strip()
        if not RUN_ID_PATTERN.fullmatch(text):
            return None
        try:
            run = retry(lambda: self.client.get_run(text))
        except Exception as err:  # MLflow answers a missing run with RESOURCE_DOES_NOT_EXIST
            if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
                return None
            raise
        return text if run.info.experiment_id == self.experiment_id else None

    def finish_trial(self, run_id: str, status: str, reason: str | None = None) -> None:
        if reason:
            retry(lambda: self.client.set_tag(run_id, TAG_REASON, reason[:5000]))
        retry(lambda: self.client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED"))

    def finish_study(self, status: str) -> None:
        retry(lambda: self.client.set_terminated(self.parent_id, status))

    def trial_runs(self) -> list[Any]:
        return retry(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TAG_STUDY}` = '{self.study}' and "
                f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'", max_results=10000,
            )
        )


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_text(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        retry(lambda: mlflow_client.log_batch(run_id, params=items[i : i + 100]))


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
                retry(lambda: self._client.log_batch(self.run_id, metrics=batch), attempts=attempts)
            except Exception:
                return False
            del self.pending[: len(batch)]
        self._next_try = 0.0
        return True


def backfill(sink: MLflowSink, rows: Iterable[dict[str, Any]]) -> None:
    """Send any step the controller could not deliver (MLflow was down), from the local log."""
    c = client(sink.uri)
    logged = {m.step for m in retry(lambda: c.get_metric_history(sink.run_id, LOSS))}
    sink.pending.clear()
    for row in rows:
        if int(row["step"]) not in logged:
            sink.add(row)
    if not sink.flush(attempts=30):
        raise RuntimeError(f"MLflow at {store.redact_uri(sink.uri)} stayed unreachable; metrics are kept in "
                           "metrics.jsonl")


class SampleGridSink:
    """Uploads each evaluation's sample grid (``samples/*.png`` in the trial folder) to the
    trial's MLflow run, under ``samples/``, as the step's metrics arrive.

    Runs in the trial's controller beside :class:`MLflowSink`, so it reads the trial folder
    that rank 0 wrote: local or mounted storage only (with remote storage run_trial writes no
    grids). ``add`` never raises; whatever failed to upload goes out with ``sweep``, which the
    driver calls once the trial ends (log_artifact overwrites, so uploading twice is harmless).
    """

    def __init__(self, uri: str, run_id: str, folder: str | Path):
        self.uri, self.run_id, self.folder = uri, run_id, Path(folder)
        self.sent: set[str] = set()
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _upload(self, path: Path) -> bool:
        if self._client is None:
            self._client = client(self.uri)
        try:
            retry(lambda: self._client.log_artifact(self.run_id, str(path), SAMPLES_ARTIFACT_DIR), attempts=3)
        except Exception:
            return False
        self.sent.add(path.name)
        return True

    def add(self, metrics: dict[str, Any]) -> None:
        if FID not in metrics:
            return
        from dit.train import sample_grid_path

        path = sample_grid_path(self.folder, int(metrics["step"]))
        if path.is_file() and path.name not in self.sent:
            self._upload(path)

    def sweep(self) -> int:
        """Upload every grid in the folder not sent yet; returns how many are still missing."""
        missing = 0
        for path in sorted(self.folder.glob("samples_step*.png")) if self.folder.is_dir() else []:
            if path.name not in self.sent and not self._upload(path):
                missing += 1
        return missing
