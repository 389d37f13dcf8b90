"""A study's life: validate, create (MLflow parent run), run every cell on Ray Tune, resume, status.

Study folder (``<storage>/<study name>/``)::

    study.json            spec hash and file, written when the study is created
    mlflow.db, mlartifacts/   the default tracking store (sqlite) and its artifacts
    tune-N/               Ray Tune's experiment of the N-th run or resume
    trials/<cell>/        Ray Train run: checkpoints, metrics.jsonl, mlflow_run_id, outcome.json,
                          samples/ (a PNG grid per evaluation, also the child run's samples/ artifacts)

Each Tune trial is a function trainable that fits the cell's TorchTrainer (the Ray Train V2
pattern; passing a Trainer to a Tuner is gone). A cell whose ``outcome.json`` says it ended
is never rerun, so resuming a killed study finishes only what was unfinished; a cell that
was cut off mid-training resumes from its last checkpoint and keeps its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit.errors import ConfigError
from orchestrator.progress import (
    CANCEL_FILE,
    ProgressPrinter,
    eta_seconds,
    last_metrics,
    make_cancel_stopper,
    request_cancel,
)
from orchestrator.spec import Cell, StudySpec, load_spec, order_by_cost
from orchestrator.tracking import (
    RUN_ID_FILE,
    TRIAL_PARAMS,
    MLflowSink,
    StudyTracker,
    check_reachable,
    resolve_tracking_uri,
)
from orchestrator.trial import SAMPLES_DIR, TrialOutcome, ensure_ray, run_trial

OUTCOME_FILE = "outcome.json"
# Outcome of a trial whose workers kept dying past max_failures: `resume` runs it again
# (from its last checkpoint). "finished" and "failed" (e.g. a NaN loss) are final.
RETRY = "error"
STATE_FILE = "study.json"


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, cell: str) -> Path:
        return self.trials / cell

    def outcome(self, cell: str) -> dict[str, Any] | None:
        path = self.trial(cell) / OUTCOME_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def study_paths(spec: StudySpec, storage: str | None) -> StudyPaths:
    root = Path(storage or spec.storage).expanduser()
    if "://" in str(storage or spec.storage):
        raise ConfigError(
            f"storage {storage or spec.storage!r}: a study folder must be a local or mounted path "
            "(NFS, a cluster file system); object stores are not supported for studies yet"
        )
    return StudyPaths(root.resolve() / spec.name)


def _spec_hash(spec: StudySpec) -> str:
    return hashlib.sha256(json.dumps(spec.resolved(), sort_keys=True, default=str).encode()).hexdigest()


def _claim_folder(paths: StudyPaths, spec: StudySpec, spec_path: Path, resume: bool) -> bool:
    """Create the study folder, or check that an existing one belongs to this spec.

    Returns True when the study already existed (we are resuming).
    """
    state_file = paths.root / STATE_FILE
    digest = _spec_hash(spec)
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("spec_sha256") != digest:
            raise ConfigError(
                f"study folder {paths.root} holds study {spec.name!r} with a different spec "
                f"({state.get('spec_file')}); rename the study, change --storage, or delete the folder"
            )
        return True
    if resume:
        raise ConfigError(f"nothing to resume: {paths.root} holds no study; use `ditscale run`")
    paths.trials.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, paths.root / "spec.yaml")
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": spec.name, "spec_sha256": digest, "spec_file": str(spec_path),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    tmp.replace(state_file)
    return False


def cell_params(cell: Cell) -> dict[str, Any]:
    mc = cell.model_config()
    values = {
        # A readable name for every cell ("DiT-tiny/2" for a custom size); the full custom
        # config goes in model_config.
        "model": cell.model if isinstance(cell.model, str) else f"DiT-{cell.size}/{cell.patch_size}",
        "patch_size": mc.patch_size, "depth": mc.depth, "hidden_size": mc.hidden_size,
        "num_heads": mc.num_heads, "block": mc.block, "image_size": cell.image_size,
        "gflops": float(f"{cell.gflops:.6g}"), "params": cell.params,
        "global_batch": cell.train.global_batch, "lr": cell.train.lr, "steps": cell.train.steps,
        "zero_stage": cell.train.zero_stage, "precision": cell.train.precision,
    }
    assert set(values) == set(TRIAL_PARAMS)
    extra = {"model_config": json.dumps(mc.to_dict(), sort_keys=True), "workers": cell.workers, "tokens": cell.tokens, "micro_batch": cell.train.micro_batch,
             "ema_decay": cell.train.ema_decay, "seed": cell.train.seed, "data": cell.train.data,
             **{f"axis.{k}": v for k, v in cell.axes.items()}}
    return {**values, **extra}


def cell_tags(cell: Cell) -> dict[str, str]:
    """Tags of a trial's child run that depend on the cell: how its FID is made (eval.features,
    eval.num_samples, eval.sampler, eval.steps, eval.cfg_scale, ...; none with eval off)."""
    from dit.evaluate import eval_tags

    return eval_tags(cell.train.eval, cell.image_size)


def cells_table(cells: list[Cell]) -> list[dict[str, Any]]:
    return [
        {"cell": c.name, "model": c.model if isinstance(c.model, str) else c.name, "block": c.block,
         "gflops": c.gflops, "params": c.params, "tokens": c.tokens,
         "compute_gflops": c.compute_gflops, "workers": c.workers}
        for c in cells
    ]


def max_concurrent(cells: list[Cell], override: int | None) -> int:
    """How many trials may wait on or hold workers at once.

    Bounded by how many of the smallest cells fit the cluster together: more trial drivers
    could never all run, and fewer would keep small cells from filling GPUs that a large
    cell at the head of the queue cannot use yet (Ray places whichever worker group fits).
    """
    if override:
        return override
    import ray

    total = ray.cluster_resources()
    fits = []
    for c in cells:
        k = total.get("CPU", 0) // (c.workers * c.cpus_per_worker) if c.cpus_per_worker else len(cells)
        if c.use_gpu:
            k = min(k, total.get("GPU", 0) // (c.workers * c.gpus_per_worker))
        fits.append(int(k))
    if max(fits) < 1:
        raise ConfigError(
            f"the cluster ({ {r: total.get(r, 0) for r in ('CPU', 'GPU')} }) cannot fit any cell; "
            "lower resources.workers / cpus_per_worker / gpus_per_worker or add nodes"
        )
    return max(1, min(max(fits), len(cells)))


# --------------------------------------------------------------------------------------------
# The Tune trial (runs in a Ray actor)
# --------------------------------------------------------------------------------------------


def _trial_fn(config: dict[str, Any], context: dict[str, Any]) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cell: Cell = context["cells"][config["cell"]]
    paths = StudyPaths(Path(context["root"]))
    done = paths.outcome(cell.name)
    if done is not None and done["status"] != RETRY:  # ended before a restart: never rerun
        tune.report({"status": done["status"], "step": done["step"]})
        return
    tracker = StudyTracker(context["uri"], context["study"], context["experiment"], None)
    run_id = tracker.trial_run(
        cell.name, cell_params(cell), cell_tags(cell),
        paths.trial(cell.name) / RUN_ID_FILE,
    )
    sink = MLflowSink(context["uri"], run_id)
    grids = SampleGridSink(context["uri"], run_id, paths.trial(cell.name) / SAMPLES_DIR)
    outcome = run_trial(
        cell.trial_config(str(paths.trials)),
        sinks=[sink, grids],
        gflops=cell.gflops,
        callbacks=[TuneReportCallback()],
    )
    backfill(sink, outcome)
    grids.sweep()
    tracker.finish_trial(run_id, outcome.status, outcome.reason)
    _write_outcome(paths.trial(cell.name) / OUTCOME_FILE, outcome, run_id)
    tune.report({"status": outcome.status, "step": outcome.last_step})


def backfill(sink: MLflowSink, outcome: TrialOutcome) -> None:
    """Send any step the controller could not deliver (MLflow was down), from the local log."""
    from orchestrator.tracking import _retry, client

    c = client(sink.uri)
    logged = {m.step for m in _retry(lambda: c.get_metric_history(sink.run_id, "train/loss"))}
    sink.pending.clear()
    for row in outcome.metrics:
        if int(row["step"]) not in logged:
            sink.add(row)
    if not sink.flush(attempts=30):
        raise RuntimeError(f"MLflow at {sink.uri} stayed unreachable; metrics are kept in metrics.jsonl")


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
        from orchestrator.tracking import _retry, client

        if self._client is None:
            self._client = client(self.uri)
        try:
            _retry(lambda: self._client.log_artifact(self.run_id, str(path), "samples"), attempts=3)
        except Exception:
            return False
        self.sent.add(path.name)
        return True

    def add(self, metrics: dict[str, Any]) -> None:
        if "eval/fid" not in metrics:
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


def _write_outcome(path: Path, outcome: TrialOutcome, run_id: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"status": outcome.status, "reason": outcome.reason,
                               "step": outcome.last_step, "checkpoint": outcome.checkpoint,
                               "mlflow_run_id": run_id}, indent=2))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    name: str
    root: Path
    tracking_uri: str
    parent_run_id: str
    outcomes: dict[str, dict[str, Any] | None]
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return all(o is not None and o["status"] == "finished" for o in self.outcomes.values())


def run_study(
    spec_path: str | Path,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
) -> StudyOutcome:
    """Run (or continue) every cell of a study. All validation happens before anything starts."""
    from ray import tune

    from dit.latents import Manifest

    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    cells = order_by_cost(spec.cells())
    for data in sorted({c.train.data for c in cells}):
        if spec.data.builtin and "://" not in data and not Path(data).exists():
            if not spec.data.image_size:
                raise ConfigError(f"{spec_path}: data.builtin needs data.image_size (the size to prepare at)")
            prepare_builtin(spec.data.builtin, Path(data).parent, spec.data.image_size)
        Manifest.load(data)  # missing data is a clear error before any side effect
    paths = study_paths(spec, storage)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri, paths.root)
    check_reachable(uri)
    existed = _claim_folder(paths, spec, spec_path, resume)
    (paths.root / CANCEL_FILE).unlink(missing_ok=True)  # running again lifts a cancel
    ensure_ray(address)

    tracker = StudyTracker(uri, spec.name, spec.tracking.experiment, paths.root / "mlartifacts")
    if not existed:
        tracker.log_study_files(spec_path, spec.resolved(), cells_table(cells))
    context = {
        "cells": {c.name: c for c in cells}, "root": str(paths.root), "uri": uri,
        "study": spec.name, "experiment": spec.tracking.experiment or spec.name,
    }
    # The trial function only waits on its TorchTrainer; its workers hold the CPUs and GPUs.
    # A nominal memory request (a resource every node has) keeps it from taking a CPU slot.
    driver = {"CPU": 0, "memory": 2**20}
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, context=context), driver)
    # Every run or resume is a fresh Tune experiment over the cells that have not ended.
    # (Tuner.restore would not do: Tune marks trials stopped by a cancel as TERMINATED and
    # would never rerun them. Finished cells are known from their outcome.json instead, and
    # an interrupted cell resumes from its Ray Train checkpoint inside run_trial.)
    pending = [c for c in cells if (paths.outcome(c.name) or {}).get("status") in (None, RETRY)]
    attempt = len(list(paths.root.glob("tune-*"))) + 1
    tuner = pending and tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([c.name for c in pending])},  # cost order
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent(pending or cells, spec.resources.max_concurrent_trials)
        ),
        run_config=tune.RunConfig(name=f"tune-{attempt}", storage_path=str(paths.root), verbose=0,
                                  stop=make_cancel_stopper(paths.root)),
    )
    with ProgressPrinter(paths.trials, pending):
        if pending:
            tuner.fit()
    outcomes = {c.name: paths.outcome(c.name) for c in cells}
    cancelled = (paths.root / CANCEL_FILE).exists()
    result = StudyOutcome(spec.name, paths.root, uri, tracker.parent_id, outcomes, cancelled)
    tracker.finish_study("KILLED" if cancelled else "FINISHED" if result.ok else "FAILED")
    return result


def prepare_builtin(name: str, out_dir: Path, image_size: int) -> None:
    """Encode a built-in data set (pixels as latents) in this process: small, so no Ray."""
    from dit.latents import begin_prepare, make_digits
    from dit.vae import IdentityCodec

    print(f"preparing the built-in {name} data set at {image_size} px into {out_dir}", flush=True)
    codec = IdentityCodec()
    job = begin_prepare(make_digits(image_size), codec, out_dir, train_features=True)
    job.run_local(codec, None)
    job.finish()


def cancel_study(spec_path: str | Path, storage: str | None = None) -> Path:
    """Ask a running study to stop (its driver sees the file); `ditscale resume` continues it."""
    spec = load_spec(spec_path)
    paths = study_paths(spec, storage)
    if not (paths.root / STATE_FILE).is_file():
        raise ConfigError(f"no study at {paths.root}; nothing to cancel")
    return request_cancel(paths.root)


def study_status(spec_path: str | Path, storage: str | None = None) -> list[dict[str, Any]]:
    """Per cell: status (finished / failed / running or interrupted / pending), step, loss."""
    spec = load_spec(spec_path)
    paths = study_paths(spec, storage)
    rows = []
    for cell in order_by_cost(spec.cells()):
        outcome = paths.outcome(cell.name)
        last = last_metrics(paths.trial(cell.name))
        if outcome:
            status = outcome["status"]
        elif last:
            status = "started"
        else:
            status = "pending"
        rows.append({
            "cell": cell.name, "gflops": cell.gflops, "status": status,
            "step": int(last.get("step", 0)), "steps": cell.train.steps,
            "loss": last.get("train/loss", math.nan), "fid": last_fid(paths.trial(cell.name)),
            "eta_s": None if outcome else eta_seconds(last, cell.train.steps, cell.train.global_batch),
            "reason": (outcome or {}).get("reason"),
        })
    return rows


def last_fid(trial_dir: Path) -> float | None:
    """The latest eval/fid in a trial's metric log, if it has evaluated yet."""
    path = trial_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    fids = [row["eval/fid"] for row in map(json.loads, filter(str.strip, path.read_text().splitlines()))
            if "eval/fid" in row]
    return fids[-1] if fids else None
