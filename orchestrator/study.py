"""A study's life: validate, create (MLflow parent run), run every cell on Ray Tune, resume, status.

The study folder and its files are ``orchestrator.layout``'s; the MLflow writes are
``orchestrator.tracking``'s and the names they use ``analysis.schema``'s.

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

from analysis.schema import AXIS_PARAM_PREFIX, EXTRA_TRIAL_PARAMS, FID, LOSS, TRIAL_PARAMS
from dit.errors import ConfigError
from dit.files import atomic_write_json
from orchestrator.layout import (
    METRICS_FILE,
    OUTCOME_FILE,
    RUN_ID_FILE,
    SAMPLES_DIR,
    StudyPaths,
    last_metrics,
    read_metrics,
)
from orchestrator.prepare import prepare_builtin
from orchestrator.progress import ProgressPrinter, eta_seconds, make_cancel_stopper, request_cancel
from orchestrator.ray_env import configure_process_env
from orchestrator.spec import Cell, StudySpec, load_spec, order_by_cost
from orchestrator.tracking import (
    MLflowSink,
    SampleGridSink,
    StudyTracker,
    backfill,
    check_reachable,
    resolve_tracking_uri,
)
from orchestrator.trial import TrialOutcome, ensure_ray, run_trial

# Outcome of a trial whose workers kept dying past max_failures: `resume` runs it again
# (from its last checkpoint). "finished" and "failed" (e.g. a NaN loss) are final.
RETRY = "error"


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
    state_file = paths.state
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
    shutil.copyfile(spec_path, paths.spec_copy)
    atomic_write_json(state_file, {"name": spec.name, "spec_sha256": digest, "spec_file": str(spec_path),
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
             "ema_decay": cell.train.ema_decay, "seed": cell.train.seed, "data": cell.train.data}
    assert set(extra) == set(EXTRA_TRIAL_PARAMS)
    axes = {f"{AXIS_PARAM_PREFIX}{k}": v for k, v in cell.axes.items()}
    return {**values, **extra, **axes}


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
    backfill(sink, outcome.metrics)
    grids.sweep()
    tracker.finish_trial(run_id, outcome.status, outcome.reason)
    _write_outcome(paths.trial(cell.name) / OUTCOME_FILE, outcome, run_id)
    tune.report({"status": outcome.status, "step": outcome.last_step})


def _write_outcome(path: Path, outcome: TrialOutcome, run_id: str) -> None:
    atomic_write_json(path, {"status": outcome.status, "reason": outcome.reason, "step": outcome.last_step,
                             "checkpoint": outcome.checkpoint, "mlflow_run_id": run_id})


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
    configure_process_env()  # before Ray is imported (a no-op after the `ditscale` command's own call)
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path)
    cells = order_by_cost(spec.cells())
    _check_data(spec, spec_path, cells)
    paths = study_paths(spec, storage)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri, paths.root)
    check_reachable(uri)
    existed = _claim_folder(paths, spec, spec_path, resume)
    paths.cancel.unlink(missing_ok=True)  # running again lifts a cancel
    ensure_ray(address)

    tracker = StudyTracker(uri, spec.name, spec.tracking.experiment, paths.artifacts)
    if not existed:
        tracker.log_study_files(spec_path, spec.resolved(), cells_table(cells))
    context = {
        "cells": {c.name: c for c in cells}, "root": str(paths.root), "uri": uri,
        "study": spec.name, "experiment": spec.tracking.experiment or spec.name,
    }
    pending = [c for c in cells if (paths.outcome(c.name) or {}).get("status") in (None, RETRY)]
    tuner = pending and _tuner(paths, context, pending, spec.resources.max_concurrent_trials)
    with ProgressPrinter(paths.trials, pending):
        if pending:
            tuner.fit()
    outcomes = {c.name: paths.outcome(c.name) for c in cells}
    cancelled = paths.cancel.exists()
    result = StudyOutcome(spec.name, paths.root, uri, tracker.parent_id, outcomes, cancelled)
    tracker.finish_study("KILLED" if cancelled else "FINISHED" if result.ok else "FAILED")
    return result


def _check_data(spec: StudySpec, spec_path: Path, cells: list[Cell]) -> None:
    """Prepare a missing built-in data set; a missing manifest is a clear error before any side effect."""
    from dit.latents import Manifest

    for data in sorted({c.train.data for c in cells}):
        if spec.data.builtin and "://" not in data and not Path(data).exists():
            if not spec.data.image_size:
                raise ConfigError(f"{spec_path}: data.builtin needs data.image_size (the size to prepare at)")
            prepare_builtin(spec.data.builtin, Path(data).parent, spec.data.image_size)
        Manifest.load(data)


def _tuner(paths: StudyPaths, context: dict[str, Any], pending: list[Cell], max_trials: int | None):
    """A fresh Tune experiment over the cells that have not ended, in cost order.

    Every run or resume is one: Tuner.restore would not do, since Tune marks trials stopped by
    a cancel as TERMINATED and would never rerun them. Finished cells are known from their
    outcome.json instead, and an interrupted cell resumes from its Ray Train checkpoint inside
    run_trial.
    """
    from ray import tune

    # The trial function only waits on its TorchTrainer; its workers hold the CPUs and GPUs.
    # A nominal memory request (a resource every node has) keeps it from taking a CPU slot.
    driver = {"CPU": 0, "memory": 2**20}
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, context=context), driver)
    attempt = len(paths.tune_runs()) + 1
    return tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([c.name for c in pending])},  # cost order
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent(pending, max_trials)),
        run_config=tune.RunConfig(name=f"tune-{attempt}", storage_path=str(paths.root), verbose=0,
                                  stop=make_cancel_stopper(paths.root)),
    )


def cancel_study(spec_path: str | Path, storage: str | None = None) -> Path:
    """Ask a running study to stop (its driver sees the file); `ditscale resume` continues it."""
    spec = load_spec(spec_path)
    paths = study_paths(spec, storage)
    if not paths.state.is_file():
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
            "loss": last.get(LOSS, math.nan), "fid": last_fid(paths.trial(cell.name)),
            "eta_s": None if outcome else eta_seconds(last, cell.train.steps, cell.train.global_batch),
            "reason": (outcome or {}).get("reason"),
        })
    return rows


def last_fid(trial_dir: Path) -> float | None:
    """The latest eval/fid in a trial's metric log, if it has evaluated yet."""
    fids = [row[FID] for row in read_metrics(Path(trial_dir) / METRICS_FILE) if FID in row]
    return fids[-1] if fids else None
