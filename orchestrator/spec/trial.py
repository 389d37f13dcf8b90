"""A trial's config: what ``ditscale train CONFIG.yaml`` reads and what every study cell builds.

The YAML is flat (``name``, ``train``, ``workers``, ``use_gpu``, ...): :class:`TrialConfig`
is :class:`~orchestrator.spec.resources.WorkerResources` plus a name, the recipe and storage.
Running one is ``orchestrator.trial.run_trial``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from dit.errors import ConfigError
from dit.train import TrainConfig
from orchestrator.spec.limits import check_values
from orchestrator.spec.resources import WorkerResources
from orchestrator.spec.yamlfile import read_yaml


class TrialConfig(WorkerResources):
    """What ``ditscale train CONFIG.yaml`` reads: a name, resources, storage and the recipe."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$", description="deterministic run name")
    train: TrainConfig
    storage: str = Field("runs", description="local folder or pyarrow/fsspec URI (s3://, gs://, ...)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_batch(self) -> "TrialConfig":
        self.train.accumulation(self.workers)
        return self

    def storage_uri(self) -> str:
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_trial_config(path: str | Path, **overrides: Any) -> TrialConfig:
    """Read and validate a trial YAML; every problem becomes a ConfigError naming the field."""
    raw = read_yaml(path, "trial config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, train, workers, ...")
    check_values(raw, str(path))  # before validation, which would expand an alias bomb
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
