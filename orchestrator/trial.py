"""One trial = one DiT trained by N Ray Train workers (TorchTrainer, Ray Train V2).

Flow: ``run_trial`` validates everything, makes sure Ray is up, and fits a TorchTrainer
whose workers run ``dit.train.train``. Every rank stages its DeepSpeed shard in its own
folder and calls ``ray.train.report`` with it; Ray merges the shards into one checkpoint
folder in storage. A dead worker restarts the group from that checkpoint
(``FailureConfig``); rerunning the same trial name resumes from it too.

Metrics reach the caller through ``ray.train.UserCallback``s, which Ray runs in the
trial's controller process: one writer per trial, never the workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dit.errors import ConfigError
from dit.train import TrainConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"  # in the trial folder: one PNG grid per evaluation (local storage only)
NONFINITE = "failure/nonfinite_loss"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.2"  # seconds between a controller's polls of its workers (see train_env)


class TrialConfig(BaseModel):
    """What ``ditscale train CONFIG.yaml`` reads: a name, resources, storage and the recipe."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$", description="deterministic run name")
    train: TrainConfig
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional on a laptop: 2 workers fit 2 cores")
    gpus_per_worker: float = Field(1.0, ge=0)
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
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read trial config {str(path)!r}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, train, workers, ...")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": train_env()})
        return
    # (orchestrator/__init__ keeps a local Ray on 127.0.0.1.)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"], **train_env()}},
    )


def train_env() -> dict[str, str]:
    """Environment for every process of the job (Ray Train controllers included).

    A worker's ``ray.train.report`` waits in a one-slot queue until the trial's controller polls
    it, and the controller polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a
    trial that reports every 0.3 s of training then runs at one report per 2 s. Measured on the
    demo's smallest cell: 26 reports took 47 s of a 62 s trial for 5 s of training. Polling every
    0.2 s costs the controller a few cheap RPCs; a value set by the user wins.
    """
    return {HEALTH_CHECK_ENV: os.environ.get(HEALTH_CHECK_ENV, REPORT_POLL_S)}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    from dit.train import NonFiniteLoss, TrainConfig, train

    cfg = TrainConfig.model_validate(config["train"])
    staging = Path(tempfile.mkdtemp(prefix="ditscale-stage-"))

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(checkpoint_dir),
            checkpoint_dir_name=Path(checkpoint_dir).name,  # the same on every rank: merged
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # uploaded; storage holds it now

    checkpoint = ray.train.get_checkpoint()
    try:
        with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
            train(
                cfg,
                report,
                resume_from=resume_dir,
                checkpoint_root=staging,
                gflops=config.get("gflops"),
                fault=_fault_hook(config.get("fault")),
                sample_dir=config.get("sample_dir"),
            )
    except NonFiniteLoss as err:
        # Deterministic: a restart would diverge again. End the run (every rank raised at the
        # same step, all-reduced loss) and let the driver mark it failed with the reason.
        report({"step": err.step, NONFINITE: 1.0, "failure/loss": err.value}, None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fault_hook(fault: dict[str, Any] | None):
    """Test-only fault injection, from ``run_trial(fault=...)``.

    {"kill_at": step, "rank": r, "marker": path}: SIGKILL rank r after that step, once (the
    marker file remembers across the restart). {"nan_at": step}: poison the weights.
    """
    if not fault:
        return None
    import torch
    import torch.distributed as dist

    def hook(step: int, engine: Any) -> None:
        if step == fault.get("nan_at"):
            with torch.no_grad():
                for p in engine.module.parameters():
                    p.fill_(float("nan"))
        marker = Path(fault.get("marker", "/nonexistent"))
        if step == fault.get("kill_at") and dist.get_rank() == fault.get("rank", 0) and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class MetricLog:
    """Keeps every step's metrics exactly once, however often the workers replay a step.

    After a restart from a checkpoint the workers recompute (identically) the steps since
    that checkpoint; reports at or below the high-water step are dropped. The log is a JSONL
    file in the trial folder, read back on construction so a restarted driver continues it.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.rows: list[dict[str, float]] = []
        if self.path and self.path.is_file():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    @property
    def last_step(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0

    def add(self, metrics: dict[str, Any]) -> bool:
        if int(metrics["step"]) <= self.last_step:
            return False
        row = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.rows.append(row)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return True


def make_metric_callback(sinks: Sequence[Any]):
    """A ray.train.UserCallback that hands rank 0's metrics to each sink's ``add``."""
    from ray.train import UserCallback

    class _Forward(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metrics[0]:
                for sink in sinks:
                    sink.add(metrics[0])

    return _Forward()


def trial_dir(cfg: TrialConfig) -> Path | None:
    uri = cfg.storage_uri()
    return None if "://" in uri else Path(uri) / cfg.name


@dataclass
class TrialOutcome:
    name: str
    status: str  # "finished" | "failed" (deterministic, e.g. NaN) | "error" (workers kept dying)
    reason: str | None
    metrics: list[dict[str, float]]
    checkpoint: str | None  # the latest checkpoint folder in storage

    @property
    def last_step(self) -> int:
        return int(self.metrics[-1]["step"]) if self.metrics else 0


def run_trial(
    cfg: TrialConfig,
    *,
    address: str | None = None,
    sinks: Sequence[Any] = (),
    gflops: float | None = None,
    fault: dict[str, Any] | None = None,
    metric_log: str | Path | None = None,
    callbacks: Sequence[Any] = (),
) -> TrialOutcome:
    """Fit one trial to completion, resuming from its latest checkpoint if it has one.

    Every step's metrics land once in a JSONL log (``metric_log``, by default beside the
    checkpoints for local storage) and in each of ``sinks`` (objects with ``add(metrics)``,
    such as an MLflow logger); ``callbacks`` are extra ``ray.train.UserCallback``s (e.g.
    Tune's report bridge). Worker crashes are retried ``max_failures`` times; a non-finite
    loss ends the trial at once as "failed" with its step. With evaluation on and local
    storage, each evaluation's sample grid lands in ``<trial folder>/samples/`` (rank 0 writes
    it before that step's report; multi-node needs the folder shared, as Ray Train does).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    from dit.latents import Manifest

    Manifest.load(cfg.train.data)  # a missing or broken manifest fails here, before Ray starts
    ensure_ray(address)
    local = trial_dir(cfg)
    log_path = Path(metric_log) if metric_log else (local / METRICS_FILE if local else None)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="ditscale-metrics-")) / METRICS_FILE
    log = MetricLog(log_path)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train": cfg.train.model_dump(), "gflops": gflops, "fault": fault,
                           "sample_dir": str(local / SAMPLES_DIR) if local and cfg.train.eval.enabled else None},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_uri(),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[make_metric_callback([log, *sinks]), *callbacks],
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        rows = MetricLog(log_path).rows
        return TrialOutcome(cfg.name, "error", _first_line(err), rows, None)
    rows = MetricLog(log_path).rows  # the controller wrote it; read back its record
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if rows and NONFINITE in rows[-1]:
        reason = f"non-finite loss ({rows[-1].get('failure/loss')}) at step {int(rows[-1]['step'])}"
        return TrialOutcome(cfg.name, "failed", reason, rows, checkpoint)
    return TrialOutcome(cfg.name, "finished", None, rows, checkpoint)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
