"""Studies as tidy pandas frames: from MLflow (finished or still running) or a published table.

Three frames, one obvious row each:

``trials``  one row per trial: the stable params (model, patch_size, depth, hidden_size,
            num_heads, block, image_size, gflops, params, global_batch, lr, steps, zero_stage,
            precision), status, last step, final training compute, final loss and FID, and
            the FID protocol tags.
``evals``   one row per trial per evaluation step: step, training compute (``compute_gflops``)
            and one column per ``eval/*`` metric under its MLflow name (``eval/fid``, ...).
``losses``  one row per trial per logged step: step, ``train/loss``, ``compute_gflops``.

Training compute at a step is read from the trial's ``train/compute_gflops`` history (the
trainer logs the images it actually consumed) and, where that history does not reach, is
``gflops × 3 × global_batch × step`` (the paper's formula, ``dit.flops.training_compute``).

A published table (the DiT paper's Table 4 ships as ``dit/reference/dit_paper_table4.csv``)
loads into the same frames, so the paper's numbers can be fitted and plotted beside a study.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import store
from analysis.schema import (
    COMPUTE_METRIC,
    EVAL_PREFIX,
    FID,
    FID_TAGS,
    FLOAT_PARAMS,
    INT_PARAMS,
    KIND_STUDY,
    KIND_TRIAL,
    LOSS,
    RESOLVED_SPEC_ARTIFACT,
    STR_PARAMS,
    STUDY_DB_FILE,
    TAG_KIND,
    TAG_PARENT,
    TAG_REASON,
    TAG_STUDY,
    TAG_TRIAL,
    size_by_config,
)
from dit.errors import ConfigError

TRIAL_COLUMNS = [
    "trial", "model", "size", "patch_size", "depth", "hidden_size", "num_heads", "block", "image_size",
    "gflops", "params", "global_batch", "lr", "steps", "zero_stage", "precision", "status", "last_step",
    "compute_gflops", "final_loss", "final_loss_avg", "final_fid", "final_fid_step", "eval.features",
    "eval.num_samples", "failure_reason", "run_id", "source",
]
EVAL_KEYS = ["trial", "model", "size", "patch_size", "gflops", "params", "global_batch", "step",
             "compute_gflops"]
LOSS_COLUMNS = ["trial", "model", "size", "patch_size", "gflops", "step", LOSS, "compute_gflops"]

_SIZE_FROM_NAME = re.compile(r"^DiT-([A-Za-z]+)/\d+$")


@dataclass
class StudyData:
    """A study (or a published table) as frames, plus where it came from."""

    name: str
    trials: pd.DataFrame
    evals: pd.DataFrame
    losses: pd.DataFrame
    source: str = "mlflow"  # "mlflow" or "published"
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    parent_status: str | None = None
    spec: dict[str, Any] | None = None
    protocol: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_fid(self) -> bool:
        return FID in self.evals.columns and bool(self.evals[FID].notna().any())

    @property
    def eval_metrics(self) -> list[str]:
        return [c for c in self.evals.columns if c.startswith(EVAL_PREFIX)]


# ------------------------------------------------------------------------------------------
# Helpers shared by both sources
# ------------------------------------------------------------------------------------------


def model_size(model: Any, depth: Any = None, hidden: Any = None) -> str:
    """'S', 'B', 'L', 'XL' for the paper's configs, else 'd{depth}-h{hidden}' (or the name)."""
    m = _SIZE_FROM_NAME.match(str(model or ""))
    if m:
        return m.group(1)
    try:
        key = (int(depth), int(hidden))
    except (TypeError, ValueError):
        return str(model)
    return size_by_config().get(key, f"d{key[0]}-h{key[1]}")


def training_compute(gflops: Any, global_batch: Any, step: Any) -> Any:
    """The paper's training compute in Gflops: forward Gflops × 3 × batch × steps, element-wise.

    ``dit.flops.training_compute`` of one step's images, times the steps."""
    from dit.flops import training_compute as compute_of

    per_step = compute_of(np.asarray(gflops, dtype=float), np.asarray(global_batch, dtype=float))
    return per_step * np.asarray(step, dtype=float)


def _compute_at(steps: np.ndarray, gflops: float, batch: float, history: pd.DataFrame | None) -> np.ndarray:
    steps = np.asarray(steps, dtype=float)
    out = training_compute(gflops, batch, steps)
    if history is not None and len(history):
        hs, hv = history["step"].to_numpy(float), history["value"].to_numpy(float)
        inside = (steps >= hs.min()) & (steps <= hs.max())
        # Before the first logged point, scale linearly from zero.
        out = np.where(inside, np.interp(steps, hs, hv), out)
    return out


def _num(value: Any, kind: type) -> Any:
    if value is None or value == "":
        return np.nan if kind is float else pd.NA
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return np.nan if kind is float else pd.NA


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


# ------------------------------------------------------------------------------------------
# MLflow
# ------------------------------------------------------------------------------------------


def _client(uri: str):
    return store.client(uri)


def default_tracking_uri(study: str | None = None, storage: str | Path = "runs") -> str | None:
    """MLFLOW_TRACKING_URI, else the sqlite file of a study folder ``<storage>/<study>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if study:
        for candidate in (Path(storage) / study / STUDY_DB_FILE, Path(study) / STUDY_DB_FILE):
            if candidate.is_file():
                return f"sqlite:///{candidate.resolve()}"
    return None


def _check_store(uri: str) -> None:
    """A sqlite URI must name an existing file: MLflow would silently create an empty store."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise ConfigError(f"no MLflow tracking store at {path} (from {uri!r}); pass the study's "
                              "--tracking-uri (a study folder keeps it as mlflow.db)")


def _all_pages(fn, **kwargs) -> list[Any]:
    out, token = [], None
    while True:
        page = fn(**kwargs, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_study_run(client, study: str):
    """The study's parent run, by parent run id or by study name (in any experiment)."""
    if re.fullmatch(r"[0-9a-f]{32}", study):
        try:
            run = client.get_run(study)
        except Exception:  # noqa: BLE001
            run = None
        if run is not None:
            if run.data.tags.get(TAG_KIND) not in (None, KIND_STUDY) or TAG_STUDY not in run.data.tags:
                raise ConfigError(f"run {study} is not a ditscale study run (tag {TAG_KIND}={KIND_STUDY})")
            return run
    where = f"tags.`{TAG_KIND}` = '{KIND_STUDY}' and tags.`{TAG_STUDY}` = '{_quote(study)}'"
    exp = client.get_experiment_by_name(study)
    experiments = [exp] if exp is not None and exp.lifecycle_stage == "active" else []
    for ids in ([e.experiment_id for e in experiments], None):
        if ids is None:  # the spec may name another experiment: look everywhere
            ids = [e.experiment_id for e in _all_pages(client.search_experiments, max_results=1000)]
        if not ids:
            continue
        runs = client.search_runs(ids, filter_string=where, max_results=10,
                                  order_by=["attributes.start_time ASC"])
        if runs:
            return runs[0]
    known = list_studies(client)
    hint = f"; studies in this store: {', '.join(known)}" if known else "; this store holds no ditscale study"
    raise ConfigError(f"no study named {study!r} (nor a study run with that id) in {store.redact_uri(client.tracking_uri)}{hint}")


def list_studies(client) -> list[str]:
    ids = [e.experiment_id for e in _all_pages(client.search_experiments, max_results=1000)]
    if not ids:
        return []
    runs = client.search_runs(ids, filter_string=f"tags.`{TAG_KIND}` = '{KIND_STUDY}'", max_results=1000)
    return sorted({r.data.tags.get(TAG_STUDY, "") for r in runs} - {""})


def _history(client, run_id: str, key: str) -> pd.DataFrame:
    ms = client.get_metric_history(run_id, key)
    if not ms:
        return pd.DataFrame({"step": pd.Series(dtype=int), "value": pd.Series(dtype=float)})
    df = pd.DataFrame({"step": [m.step for m in ms], "value": [m.value for m in ms],
                       "timestamp": [m.timestamp for m in ms]})
    # A resumed trial may log a step twice: keep the latest write.
    df = df.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last")
    return df[["step", "value"]].reset_index(drop=True)


def _load_spec(client, run_id: str) -> dict[str, Any] | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, RESOLVED_SPEC_ARTIFACT, tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001
        return None


def load_study(study: str, tracking_uri: str | None = None) -> StudyData:
    """Load a study by name or parent run id from any MLflow tracking store.

    Works on a study that is still running: RUNNING trials come with what they logged so
    far. Raises ConfigError when the store or the study does not exist.
    """
    uri = tracking_uri or default_tracking_uri(study)
    if not uri:
        raise ConfigError(f"where is study {study!r}? pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    _check_store(uri)
    client = _client(uri)
    try:
        parent = find_study_run(client, study)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 -- server down, wrong scheme, unreadable store
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ConfigError(f"MLflow tracking store {uri!r} could not be read ({type(err).__name__}: {first}); "
                          "check --tracking-uri and that the server is running") from None
    name = parent.data.tags[TAG_STUDY]
    exp_id = parent.info.experiment_id
    where = f"tags.`{TAG_STUDY}` = '{_quote(name)}' and tags.`{TAG_KIND}` = '{KIND_TRIAL}'"
    runs = {r.info.run_id: r for r in _all_pages(client.search_runs, experiment_ids=[exp_id],
                                                  filter_string=where, max_results=1000)}
    for r in _all_pages(client.search_runs, experiment_ids=[exp_id],
                        filter_string=f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'", max_results=1000):
        runs.setdefault(r.info.run_id, r)

    trial_rows, eval_frames, loss_frames = [], [], []
    for run in sorted(runs.values(), key=lambda r: r.info.start_time or 0):
        row, evals, losses = _trial_frames(client, run)
        trial_rows.append(row)
        eval_frames.append(evals)
        loss_frames.append(losses)
    trials = _finish_trials(pd.DataFrame(trial_rows, columns=TRIAL_COLUMNS) if trial_rows
                            else _empty(TRIAL_COLUMNS))
    evals = _concat(eval_frames, EVAL_KEYS)
    losses = _concat(loss_frames, LOSS_COLUMNS)
    data = StudyData(
        name=name, trials=trials, evals=evals, losses=losses, source="mlflow", tracking_uri=uri,
        experiment_id=exp_id, parent_run_id=parent.info.run_id, parent_status=parent.info.status,
        spec=_load_spec(client, parent.info.run_id),
    )
    data.protocol = describe_protocol(trials)
    if not len(trials):
        data.notes.append("the study has no trial runs yet")
    elif not data.has_fid:
        data.notes.append("no FID yet: no trial has logged eval/fid")
    return data


def _trial_frames(client, run) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    p, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    row: dict[str, Any] = {"trial": tags.get(TAG_TRIAL) or run.info.run_name or run.info.run_id}
    for k in INT_PARAMS:
        row[k] = _num(p.get(k), int)
    for k in FLOAT_PARAMS:
        row[k] = _num(p.get(k), float)
    for k in STR_PARAMS:
        row[k] = p.get(k)
    row["size"] = model_size(row["model"], row["depth"], row["hidden_size"])
    row["status"] = run.info.status
    row["run_id"] = run.info.run_id
    row["failure_reason"] = tags.get(TAG_REASON)
    row["source"] = "study"
    for t in FID_TAGS:
        row[t] = tags.get(t)
    gflops = row["gflops"]
    batch = float(row["global_batch"]) if row["global_batch"] is not pd.NA else np.nan

    compute_hist = _history(client, run.info.run_id, COMPUTE_METRIC) if COMPUTE_METRIC in metrics else None
    loss_hist = _history(client, run.info.run_id, LOSS)
    eval_keys = sorted(k for k in metrics if k.startswith(EVAL_PREFIX))
    eval_df = None
    for key in eval_keys:
        h = _history(client, run.info.run_id, key).rename(columns={"value": key})
        eval_df = h if eval_df is None else eval_df.merge(h, on="step", how="outer")
    if eval_df is None:
        eval_df = pd.DataFrame({"step": pd.Series(dtype=int)})
    eval_df = eval_df.sort_values("step").reset_index(drop=True)
    for k in ("trial", "model", "size", "patch_size", "gflops", "params", "global_batch"):
        eval_df[k] = row[k]
    eval_df["compute_gflops"] = _compute_at(eval_df["step"].to_numpy(), gflops, batch, compute_hist)

    losses = pd.DataFrame({"step": loss_hist["step"], LOSS: loss_hist["value"]})
    for k in ("trial", "model", "size", "patch_size", "gflops"):
        losses[k] = row[k]
    losses["compute_gflops"] = _compute_at(losses["step"].to_numpy(), gflops, batch, compute_hist)

    steps = [int(m) for m in (loss_hist["step"].max() if len(loss_hist) else None,
                              eval_df["step"].max() if len(eval_df) else None,
                              compute_hist["step"].max() if compute_hist is not None and len(compute_hist)
                              else None) if m is not None and not pd.isna(m)]
    row["last_step"] = max(steps) if steps else 0
    row["compute_gflops"] = float(_compute_at(np.array([row["last_step"]]), gflops, batch, compute_hist)[0])
    if len(loss_hist):
        row["final_loss"] = float(loss_hist["value"].iloc[-1])
        tail = max(1, len(loss_hist) // 10)
        row["final_loss_avg"] = float(loss_hist["value"].iloc[-tail:].mean())
    else:
        row["final_loss"] = row["final_loss_avg"] = metrics.get(LOSS, np.nan)
    fids = eval_df[[FID, "step"]].dropna() if FID in eval_df else pd.DataFrame()
    row["final_fid"] = float(fids[FID].iloc[-1]) if len(fids) else np.nan
    row["final_fid_step"] = int(fids["step"].iloc[-1]) if len(fids) else pd.NA
    return row, eval_df, losses


def _concat(frames: list[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty(keys)
    df = pd.concat(frames, ignore_index=True)
    rest = [c for c in df.columns if c not in keys]
    return df[keys + rest]


def _finish_trials(trials: pd.DataFrame) -> pd.DataFrame:
    for k in ("gflops", "lr", "compute_gflops", "final_loss", "final_loss_avg", "final_fid"):
        trials[k] = pd.to_numeric(trials[k], errors="coerce").astype(float)
    for k in (*INT_PARAMS, "last_step", "final_fid_step"):
        trials[k] = pd.to_numeric(trials[k], errors="coerce").astype("Int64")
    return trials.sort_values(["gflops", "trial"], na_position="last").reset_index(drop=True)


def describe_protocol(trials: pd.DataFrame) -> str:
    """Which FID setup the trials used (tags eval.features / eval.num_samples)."""
    if not len(trials):
        return "unknown (no trials)"
    combos = trials[list(FID_TAGS)].astype(object).where(trials[list(FID_TAGS)].notna(), None)
    seen = sorted({(f, n) for f, n in combos.itertuples(index=False, name=None) if f or n},
                  key=lambda x: (str(x[0]), str(x[1])))
    if not seen:
        return "not recorded (no eval.features / eval.num_samples tags on the trial runs)"
    parts = [f"features={f or '?'}, samples={n or '?'}" for f, n in seen]
    text = "; ".join(parts)
    if len(seen) > 1:
        text += " -- WARNING: trials used different FID setups; their FIDs do not compare"
    return text


# ------------------------------------------------------------------------------------------
# Published tables
# ------------------------------------------------------------------------------------------

PAPER_PROTOCOL = "FID-50K as published (the paper's Table 4: 400K steps, batch 256)"


def paper_table_path() -> Path:
    return Path(str(files("dit.reference").joinpath("dit_paper_table4.csv")))


def load_published(
    path: str | Path | None = None,
    *,
    name: str | None = None,
    global_batch: int = 256,
    steps: int = 400_000,
    protocol: str | None = None,
) -> StudyData:
    """A CSV of published results as a StudyData (``source='published'``).

    Columns: ``model`` and ``gflops`` are required; ``params`` or ``params_m`` (millions),
    ``depth``, ``hidden_size``, ``num_heads``, ``patch_size``, ``image_size`` are used when
    present. FID comes from ``fid`` / ``eval/fid`` / the first ``fid*`` column. Each row is
    one evaluation; ``step`` and ``global_batch`` columns override the defaults (400K steps,
    batch 256, the paper's Table 4), so one table may hold several steps per model.
    Training compute = gflops × 3 × global_batch × step. ``path=None`` is the paper's table.
    """
    path = Path(path) if path is not None else paper_table_path()
    is_paper = path.resolve() == paper_table_path().resolve()
    df = _published_rows(_read_published(path), global_batch, steps)
    evals = df[EVAL_KEYS + [c for c in df.columns if c.startswith(EVAL_PREFIX)]].copy()
    evals["step"] = evals["step"].astype("Int64")
    evals = evals.sort_values(["gflops", "step"]).reset_index(drop=True)
    trials = _published_trials(df)
    label = name or ("DiT paper (Table 4)" if is_paper else path.stem)
    return StudyData(name=label, trials=trials, evals=evals, losses=_empty(LOSS_COLUMNS), source="published",
                     protocol=protocol or (PAPER_PROTOCOL if is_paper else f"as published in {path.name}"))


def _read_published(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"published table {str(path)!r} does not exist")
    try:
        raw = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"published table {path}: not a readable CSV ({err})") from None
    raw.columns = [c.strip() for c in raw.columns]
    missing = {"model", "gflops"} - set(raw.columns)
    if missing:
        raise ConfigError(f"published table {path}: missing column(s) {sorted(missing)}; "
                          f"it has {list(raw.columns)}")
    return raw


def _published_rows(raw: pd.DataFrame, global_batch: int, steps: int) -> pd.DataFrame:
    """One row per evaluation of the table, in the columns of ``evals`` (and a few more)."""
    fid_col = next((c for c in (FID, "fid") if c in raw.columns), None) or next(
        (c for c in raw.columns if c.lower().startswith("fid")), None)
    df = pd.DataFrame({"model": raw["model"].astype(str), "gflops": pd.to_numeric(raw["gflops"], errors="coerce")})
    for k in ("depth", "hidden_size", "num_heads", "patch_size", "image_size"):
        df[k] = pd.to_numeric(raw[k], errors="coerce").astype("Int64") if k in raw else pd.NA
    if "params" in raw:
        df["params"] = pd.to_numeric(raw["params"], errors="coerce")
    elif "params_m" in raw:
        df["params"] = pd.to_numeric(raw["params_m"], errors="coerce") * 1e6
    else:
        df["params"] = np.nan
    if df["patch_size"].isna().all():
        df["patch_size"] = df["model"].str.extract(r"/(\d+)$")[0].astype(float).astype("Int64")
    df["step"] = pd.to_numeric(raw["step"], errors="coerce") if "step" in raw else float(steps)
    df["global_batch"] = (pd.to_numeric(raw["global_batch"], errors="coerce") if "global_batch" in raw
                          else float(global_batch))
    df[FID] = pd.to_numeric(raw[fid_col], errors="coerce") if fid_col else np.nan
    for c in raw.columns:  # any other eval metric the table carries
        if c.startswith(EVAL_PREFIX) and c != FID:
            df[c] = pd.to_numeric(raw[c], errors="coerce")
    df["size"] = [model_size(m, d, h) for m, d, h in zip(df["model"], df["depth"], df["hidden_size"])]
    df["trial"] = df["model"]
    df["compute_gflops"] = training_compute(df["gflops"], df["global_batch"], df["step"])
    return df


def _published_trials(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model: its last evaluation."""
    last = df.sort_values("step").groupby("trial", sort=False).tail(1)
    trials = pd.DataFrame({c: pd.Series([pd.NA] * len(last), dtype=object) for c in TRIAL_COLUMNS})
    for c in ("trial", "model", "size", "patch_size", "depth", "hidden_size", "num_heads", "image_size",
              "gflops", "params", "global_batch", "compute_gflops"):
        trials[c] = last[c].to_numpy()
    trials["steps"] = trials["last_step"] = last["step"].to_numpy()
    trials["final_fid"] = last[FID].to_numpy()
    trials["final_fid_step"] = last["step"].to_numpy()
    trials["status"] = "PUBLISHED"
    trials["source"] = "published"
    trials["final_loss"] = trials["final_loss_avg"] = np.nan
    trials["params"] = pd.to_numeric(trials["params"], errors="coerce").round().astype("Int64")
    return _finish_trials(trials)
