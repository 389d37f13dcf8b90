"""The study folder on disk: the one owner of its file names, and of reading a trial's metric log.

Study folder (``<storage>/<study name>/``)::

    study.json            spec hash and file, written when the study is created
    spec.yaml             a copy of the spec the study was created from
    CANCEL                written by ``ditscale cancel``; the running driver stops its trials
    mlflow.db, mlartifacts/   the default tracking store (sqlite) and its artifacts
    tune-N/               Ray Tune's experiment of the N-th run or resume
    report/               the report ``ditscale run`` writes at the end (analysis.report)
    trials/<cell>/        Ray Train run: checkpoints, metrics.jsonl, mlflow_run_id, outcome.json,
                          samples/ (a PNG grid per evaluation, also the child run's samples/ artifacts)

``metrics.jsonl`` holds one JSON object per completed step, appended by the trial's controller
(``orchestrator.trial.MetricLog``) and read while it grows (progress lines, ``ditscale status``):
:func:`read_metrics` is its one reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.schema import STUDY_DB_FILE

STATE_FILE = "study.json"
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
        return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(path: str | Path, *, tail: bool = False) -> list[dict[str, Any]]:
    """The rows of a metric log (``metrics.jsonl``), oldest first; ``[]`` when there is none.

    A last line that is not valid JSON yet is a row being written right now and is left out;
    a bad line anywhere else raises ``json.JSONDecodeError``. ``tail=True`` reads only the end
    of the file (the latest rows, for a log that may be long and still growing).
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
        lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    if start > 0:
        lines = lines[1:]  # the read began inside a row
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


def last_metrics(trial_dir: Path) -> dict[str, Any]:
    """The latest row of a trial's metric log, ``{}`` before its first report."""
    rows = read_metrics(Path(trial_dir) / METRICS_FILE, tail=True)
    return rows[-1] if rows else {}
