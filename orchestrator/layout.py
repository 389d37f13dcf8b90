"""The study folder on disk: the one owner of its file names, and of reading a trial's metric log.

Study folder (``<storage>/<study name>/``)::

    study.json            the study's identity (what decides its results) and spec file
    driver.lock           held (flock) by the one driver running the study; names it (host, pid)
    spec.yaml             a copy of the spec the study was created from
    CANCEL                written by ``ditscale cancel``; the running driver stops its trials
    mlflow.db, mlartifacts/   the default tracking store (sqlite) and its artifacts
    tune-N/               Ray Tune's experiment of the N-th run or resume
    report/               the report ``ditscale run`` writes at the end (analysis.report)
    trials/<cell>/        Ray Train run: checkpoints, metrics.jsonl, mlflow_run_id, outcome.json,
                          samples/ (a PNG grid per evaluation, also the child run's samples/ artifacts)

``metrics.jsonl`` holds one JSON object per completed step, appended by the trial's controller
(``orchestrator.trial.MetricLog``) and read while it grows (progress lines, ``ditscale status``):
:func:`read_metrics` is its one reader and :func:`repair_metrics` the one fix of a torn tail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.schema import STUDY_DB_FILE
from dit.errors import ConfigError
from dit.files import atomic_write_text

STATE_FILE = "study.json"
LOCK_FILE = "driver.lock"
SPEC_COPY = "spec.yaml"
CANCEL_FILE = "CANCEL"
MLFLOW_DB = STUDY_DB_FILE
ARTIFACTS_DIR = "mlartifacts"
TUNE_PREFIX = "tune-"
TRIALS_DIR = "trials"
# In a trial's folder:
OUTCOME_FILE = "outcome.json"
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
SAMPLES_DIR = "samples"  # one PNG grid per evaluation (local storage only)

_TAIL_BYTES = 8192  # enough for the last few rows of a metric log


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @property
    def trials(self) -> Path:
        return self.root / TRIALS_DIR

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def spec_copy(self) -> Path:
        return self.root / SPEC_COPY

    @property
    def cancel(self) -> Path:
        return self.root / CANCEL_FILE

    @property
    def artifacts(self) -> Path:
        return self.root / ARTIFACTS_DIR

    def tune_runs(self) -> list[Path]:
        return list(self.root.glob(f"{TUNE_PREFIX}*"))

    def trial(self, cell: str) -> Path:
        return self.trials / cell

    def outcome(self, cell: str) -> dict[str, Any] | None:
        path = self.trial(cell) / OUTCOME_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is not valid JSON; delete it to run that cell again") from None


def read_metrics(path: str | Path, *, tail: bool = False) -> list[dict[str, Any]]:
    """The rows of a metric log (``metrics.jsonl``), oldest first; ``[]`` when there is none.

    Lines that are not a JSON object are left out wherever they are: the last one may be a row
    being written right now, or one torn by a crash or a full disk; a study must still finish
    and ``status`` must still print. ``tail=True`` reads only the end of the file (the latest
    rows, for a log that may be long and still growing).
    """
    path = Path(path)
    if not path.is_file():
        return []
    with path.open("rb") as f:
        start = 0
        if tail:
            f.seek(0, 2)
            start = max(0, f.tell() - _TAIL_BYTES)
            f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    if start > 0:
        lines = lines[1:]  # the read began inside a row
    return [row for row in map(_row, lines) if row is not None]


def _row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def repair_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metric log its writer is about to append to, dropping what a crash left behind.

    A torn last line (no newline) would otherwise glue the next row onto it, and a garbled
    line is unreadable anyway: the file is rewritten (atomically) with only its good rows.
    Only the log's single writer may call this (the trial's controller, under the driver lock).
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes().decode(errors="replace")
    rows = [row for row in map(_row, raw.splitlines()) if row is not None]
    good = "".join(json.dumps(r) + "\n" for r in rows)
    if raw != good:
        atomic_write_text(path, good)
    return rows


def last_metrics(trial_dir: Path) -> dict[str, Any]:
    """The latest row of a trial's metric log, ``{}`` before its first report."""
    rows = read_metrics(Path(trial_dir) / METRICS_FILE, tail=True)
    return rows[-1] if rows else {}
