"""A study's life: validate, create (MLflow parent run), run every cell on Ray Tune, resume, status.

The study folder and its files are ``orchestrator.layout``'s; the MLflow writes are
``orchestrator.tracking``'s and the names they use ``analysis.schema``'s.

Each Tune trial is a function trainable that fits the cell's TorchTrainer (the Ray Train V2
pattern; passing a Trainer to a Tuner is gone). A cell whose ``outcome.json`` says it ended
is never rerun, so resuming a killed study finishes only what was unfinished; a cell that
was cut off mid-training resumes from its last checkpoint and keeps its MLflow run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from analysis.schema import AXIS_PARAM_PREFIX, EXTRA_TRIAL_PARAMS, FID, LOSS, TRIAL_PARAMS
from analysis.store import redact_uri
from dit.errors import ConfigError
from dit.files import atomic_write_json, atomic_write_text
from orchestrator.layout import (
    METRICS_FILE,
    OUTCOME_FILE,
    RUN_ID_FILE,
    SAMPLES_DIR,
    StudyPaths,
    last_metrics,
    read_metrics,
)
from orchestrator.lock import study_lock
from orchestrator.prepare import prepare_builtin
from orchestrator.progress import ProgressPrinter, damage_note, eta_seconds, make_cancel_stopper, request_cancel
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


# The spec sections that decide a study's results. Not in it: where things are (the spec
# file's path, storage, the manifest's absolute path), what was measured or derived when it
# was loaded (data existence, costs), tracking, resources and the cost model, so a finished
# study resumes as a no-op after the checkout moves, and on another cluster.
IDENTITY_SECTIONS = ("data", "grid", "recipe", "eval")


def study_identity(spec: StudySpec) -> dict[str, Any]:
    """The spec's result-deciding sections, as written (JSON-able)."""
    dumped = spec.model_dump(mode="json")
    dumped["grid"].pop("max_cells", None)  # a guard against typos, not part of the study
    return {"name": spec.name, **{k: dumped[k] for k in IDENTITY_SECTIONS}}


def _changed_fields(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted names of the fields that differ between two identities."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changed_fields(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if old == new else [where or "(the whole spec)"]


def _read_state(paths: StudyPaths) -> dict[str, Any]:
    try:
        state = json.loads(paths.state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict):
        raise ConfigError(f"{paths.state} is not a study record (not a JSON object); move the folder aside "
                          "or delete it to start the study again")
    return state


def _recorded_identity(paths: StudyPaths, state: dict[str, Any]) -> dict[str, Any] | None:
    """The identity a study folder was created with; folders from before study.json kept it
    are read from their spec copy."""
    if isinstance(state.get("identity"), dict):
        return state["identity"]
    try:
        raw = yaml.safe_load(paths.spec_copy.read_text())
        return study_identity(StudySpec.model_validate(raw))
    except Exception:  # an unreadable old copy: treated as a different spec, refused below
        return None


def _check_identity(paths: StudyPaths, spec: StudySpec, resume: bool) -> bool:
    """True when the folder already holds this study (we continue it); a ConfigError naming
    the changed fields when it holds another spec; False for a new study."""
    if paths.state.is_file():
        recorded = _recorded_identity(paths, _read_state(paths))
        changed = _changed_fields(recorded, study_identity(spec)) if recorded is not None else ["(unreadable record)"]
        if changed:
            raise ConfigError(
                f"study folder {paths.root} holds study {spec.name!r} with a different spec: "
                f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''} changed; undo the change, "
                "rename the study, change --storage, or delete the folder"
            )
        return True
    if resume:
        raise ConfigError(f"nothing to resume: {paths.root} holds no study; use `ditscale run`")
    return False


def _create_folder(paths: StudyPaths, spec: StudySpec, spec_path: Path) -> None:
    paths.trials.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.spec_copy, redact_uri(spec_path.read_text()))  # no tracking password on disk
    atomic_write_json(paths.state, {"name": spec.name, "identity": study_identity(spec), "spec_file": str(spec_path),
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


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


def _node_slots(cell: Cell, node: dict[str, float]) -> int:
    """How many of the cell's workers one node can hold at once."""
    asks = {r: n for r, n in cell.worker_bundle().items() if n > 0}
    return int(min((node.get(r, 0) // n for r, n in asks.items()), default=10**6))


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_cells_fit(cells: list[Cell], nodes: list[dict[str, float]] | None = None) -> None:
    """Refuse, before anything starts, a cell whose worker group no node mix can hold.

    A worker (its cpus/gpus per worker) must fit on one node, and the cell's workers on the
    nodes together; otherwise Ray would keep the trial pending forever. Measured against the
    nodes alive now (an autoscaling cluster that would add nodes later is not foreseen).
    """
    nodes = _alive_nodes() if nodes is None else nodes
    total = {r: sum(n.get(r, 0) for n in nodes) for r in ("CPU", "GPU")}
    for c in cells:
        if sum(_node_slots(c, n) for n in nodes) < c.workers:
            need = f"{c.workers} worker(s) x {c.cpus_per_worker} CPU" + (
                f" + {c.gpus_per_worker} GPU" if c.use_gpu else "")
            raise ConfigError(
                f"cell {c.name}: {need} do not fit the cluster ({len(nodes)} node(s), {total}); lower "
                "resources.workers / cpus_per_worker / gpus_per_worker for it (resources.by_size), or add nodes"
            )


def max_concurrent(cells: list[Cell], override: int | None) -> int:
    """How many trials may wait on or hold workers at once.

    Bounded by how many of the smallest cells fit the cluster together: more trial drivers
    could never all run, and fewer would keep small cells from filling GPUs that a large
    cell at the head of the queue cannot use yet (Ray places whichever worker group fits).
    """
    if override:
        return override
    nodes = _alive_nodes()
    fits = [sum(_node_slots(c, n) for n in nodes) // c.workers for c in cells]
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
    trial_folder = paths.trial(cell.name)
    run_id: str | None = None
    try:
        tracker = StudyTracker(context["uri"], context["study"], context["experiment"], None)
        run_id = tracker.trial_run(cell.name, cell_params(cell), cell_tags(cell), trial_folder / RUN_ID_FILE)
        outcome = _fit_cell(cell, paths, context["uri"], run_id, TuneReportCallback())
    except Exception as err:  # not the workers' failure (that is TrainingFailedError, in run_trial)
        # A bad input is final; anything else may pass (a tracking server down): `resume` retries it.
        status = "failed" if isinstance(err, ConfigError) else RETRY
        outcome = TrialOutcome(cell.name, status, redact_uri(f"{type(err).__name__}: {err}")[:2000],
                               read_metrics(trial_folder / METRICS_FILE), None)
    if run_id is not None:
        try:
            tracker.finish_trial(run_id, outcome.status, outcome.reason)
        except Exception as err:  # the result stands; only its MLflow status is behind
            outcome.reason = f"{outcome.reason or ''} (MLflow run left open: {type(err).__name__}: {err})".strip()
    _write_outcome(trial_folder / OUTCOME_FILE, outcome, run_id)
    tune.report({"status": outcome.status, "step": outcome.last_step})


def _fit_cell(cell: Cell, paths: StudyPaths, uri: str, run_id: str, tune_callback: Any) -> TrialOutcome:
    """Train the cell, its metrics and sample grids into its MLflow run."""
    sink = MLflowSink(uri, run_id)
    grids = SampleGridSink(uri, run_id, paths.trial(cell.name) / SAMPLES_DIR)
    outcome = run_trial(cell.trial_config(str(paths.trials)), sinks=[sink, grids], gflops=cell.gflops,
                        callbacks=[tune_callback])
    backfill(sink, outcome.metrics)
    grids.sweep()
    return outcome


def _write_outcome(path: Path, outcome: TrialOutcome, run_id: str | None) -> None:
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
    already_ended: bool = False  # every cell had ended before this run: nothing was started

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
    spec_path = Path(spec_path).resolve()
    spec = load_spec(spec_path, for_run=True)
    cells = order_by_cost(spec.cells())
    _check_data(spec, spec_path, cells)
    paths = study_paths(spec, storage)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri, paths.root)
    check_reachable(uri)
    with study_lock(paths.lock, spec.name):  # one driver per study, or exit 2 naming the holder
        existed = _check_identity(paths, spec, resume)
        pending = [c for c in cells if (paths.outcome(c.name) or {}).get("status") in (None, RETRY)]
        if pending:
            ensure_ray(address)
            check_cells_fit(pending)  # before the folder or MLflow get anything
        if not existed:
            _create_folder(paths, spec, spec_path)
        return _drive(spec, spec_path, cells, pending, paths, uri, existed)


def _drive(spec: StudySpec, spec_path: Path, cells: list[Cell], pending: list[Cell], paths: StudyPaths,
           uri: str, existed: bool) -> StudyOutcome:
    """Run the cells that have not ended, under the driver lock."""
    paths.cancel.unlink(missing_ok=True)  # running again lifts a cancel
    tracker = StudyTracker(uri, spec.name, spec.tracking.experiment, paths.artifacts)
    if not existed:
        tracker.log_study_files(spec_path, spec.resolved(), cells_table(cells))
    context = {
        "cells": {c.name: c for c in cells}, "root": str(paths.root), "uri": uri,
        "study": spec.name, "experiment": spec.tracking.experiment or spec.name,
    }
    tuner = pending and _tuner(paths, context, pending, spec.resources.max_concurrent_trials)
    with ProgressPrinter(paths.trials, pending):
        if pending:
            tuner.fit()
    outcomes = {c.name: paths.outcome(c.name) for c in cells}
    cancelled = paths.cancel.exists()
    result = StudyOutcome(spec.name, paths.root, uri, tracker.parent_id, outcomes, cancelled,
                          already_ended=not pending)
    tracker.finish_study("KILLED" if cancelled else "FINISHED" if result.ok else "FAILED")
    return result


def _check_data(spec: StudySpec, spec_path: Path, cells: list[Cell]) -> None:
    """Prepare a missing built-in data set; a missing manifest is a clear error before any side effect."""
    from dit.latents import Manifest

    for data in sorted({c.train.data for c in cells}):
        if spec.data.builtin and "://" not in data and not Path(data).exists():
            info = spec.data_info  # the shape a dry run checked: what the prepared data must have
            prepare_builtin(spec.data.builtin, Path(data).parent, info.image_size, channels=info.channels,
                            num_classes=info.num_classes, samples=spec.data.samples)
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
            "reason": (outcome or {}).get("reason") or damage_note(last) or None,
        })
    return rows


def last_fid(trial_dir: Path) -> float | None:
    """The latest eval/fid in a trial's metric log, if it has evaluated yet."""
    fids = [row[FID] for row in read_metrics(Path(trial_dir) / METRICS_FILE) if FID in row]
    return fids[-1] if fids else None
