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
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from analysis.schema import DATA_LOST, FAILURE_LOSS, NONFINITE
from analysis.store import mlflow_env
from orchestrator import ray_env
from orchestrator.layout import METRICS_FILE, SAMPLES_DIR, read_metrics, repair_metrics
from orchestrator.spec.trial import TrialConfig

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.2"  # seconds between a controller's polls of its workers (see train_env)


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1, for trials:
    every process of the job gets :func:`train_env`, a local one DS_ACCELERATOR too."""
    ray_env.ensure_ray(address, num_cpus, log_to_driver=False, env_vars=train_env(), export_accelerator=True)


def train_env() -> dict[str, str]:
    """Environment for every process of the job (Ray Train controllers included).

    A worker's ``ray.train.report`` waits in a one-slot queue until the trial's controller polls
    it, and the controller polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a
    trial that reports every 0.3 s of training then runs at one report per 2 s. Measured on the
    demo's smallest cell: 26 reports took 47 s of a 62 s trial for 5 s of training. Polling every
    0.2 s costs the controller a few cheap RPCs; a value set by the user wins.

    The MLflow credentials and TLS settings of this process (``analysis.store.mlflow_env``) go
    too: on a cluster the trial controllers that log to MLflow do not inherit our environment.
    (Ray shows a job's runtime_env in its dashboard: a shared cluster's users can read them.)
    """
    return {HEALTH_CHECK_ENV: os.environ.get(HEALTH_CHECK_ENV, REPORT_POLL_S), **mlflow_env()}


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    from dit.latents import NoReadableShardsError
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
                step_callbacks=config.get("step_callbacks") or (),
                sample_dir=config.get("sample_dir"),
            )
    except NonFiniteLoss as err:
        # Deterministic: a restart would diverge again. End the run (every rank raised at the
        # same step, all-reduced loss) and let the driver mark it failed with the reason.
        report({"step": err.step, NONFINITE: 1.0, FAILURE_LOSS: err.value}, None)
    except NoReadableShardsError as err:
        # The data is gone (an unmounted volume): restarting the workers cannot bring it back.
        # End the run now; the driver names the manifest, and `resume` retries once it is back.
        report({"step": getattr(err, "step", 0), DATA_LOST: 1.0}, None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class MetricLog:
    """Keeps every step's metrics exactly once, however often the workers replay a step.

    After a restart from a checkpoint the workers recompute (identically) the steps since
    that checkpoint; reports at or below the high-water step are dropped. The log is a JSONL
    file in the trial folder, read back on construction so a restarted driver continues it
    (a tail torn by a crash is cut off first, see ``orchestrator.layout.repair_metrics``).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.rows: list[dict[str, float]] = repair_metrics(self.path) if self.path else []

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


def make_metric_callback(log: MetricLog, sinks: Sequence[Any] = ()):
    """A ray.train.UserCallback that hands rank 0's metrics to ``log`` and, for a step the log
    had not seen (not a replay after a restart), to each sink's ``add``: every sink sees every
    step at most once."""
    from ray.train import UserCallback

    class _Forward(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metrics[0] and log.add(metrics[0]):
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
    step_callbacks: Sequence[Callable[[int, Any], None]] = (),
    metric_log: str | Path | None = None,
    callbacks: Sequence[Any] = (),
) -> TrialOutcome:
    """Fit one trial to completion, resuming from its latest checkpoint if it has one.

    Every step's metrics land once in a JSONL log (``metric_log``, by default beside the
    checkpoints for local storage) and in each of ``sinks`` (objects with ``add(metrics)``,
    such as an MLflow logger); ``callbacks`` are extra ``ray.train.UserCallback``s (e.g.
    Tune's report bridge). ``step_callbacks`` go to every worker's ``dit.train.train``
    (called with each completed step and the engine; they must pickle). Worker crashes are
    retried ``max_failures`` times; a non-finite loss ends the trial at once as "failed" with
    its step. With evaluation on and local storage, each evaluation's sample grid lands in
    ``<trial folder>/samples/`` (rank 0 writes it before that step's report; multi-node needs
    the folder shared, as Ray Train does).
    """
    from dit.latents import Manifest

    Manifest.load(cfg.train.data)  # a missing or broken manifest fails here, before Ray starts
    ensure_ray(address)
    from ray.train.v2.api.exceptions import TrainingFailedError

    local = trial_dir(cfg)
    log_path = Path(metric_log) if metric_log else (local / METRICS_FILE if local else None)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="ditscale-metrics-")) / METRICS_FILE
    loop_config = {"train": cfg.train.model_dump(), "gflops": gflops, "step_callbacks": list(step_callbacks),
                   "sample_dir": str(local / SAMPLES_DIR) if local and cfg.train.eval.enabled else None}
    trainer = _trainer(cfg, loop_config, [make_metric_callback(MetricLog(log_path), sinks), *callbacks])
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        rows = read_metrics(log_path)
        return TrialOutcome(cfg.name, "error", _first_line(err), rows, None)
    rows = read_metrics(log_path)  # the controller wrote it; read back its record
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if rows and DATA_LOST in rows[-1]:
        reason = f"every shard of {cfg.train.data} is unreadable (deleted, or its volume unmounted)"
        return TrialOutcome(cfg.name, "error", reason, rows, checkpoint)
    if rows and NONFINITE in rows[-1]:
        reason = f"non-finite loss ({rows[-1].get(FAILURE_LOSS)}) at step {int(rows[-1]['step'])}"
        return TrialOutcome(cfg.name, "failed", reason, rows, checkpoint)
    return TrialOutcome(cfg.name, "finished", None, rows, checkpoint)


def _trainer(cfg: TrialConfig, loop_config: dict[str, Any], callbacks: list[Any]):
    """The trial's TorchTrainer: its workers, storage, restarts and checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = cfg.worker_bundle()
    return TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_uri(),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
