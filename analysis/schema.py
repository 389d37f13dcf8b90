"""The MLflow names a study leaves behind: the one owner of its tags, params, metrics and artifacts.

A study is one MLflow experiment with a parent run (``ditscale.kind = study``) and a child run
per trial (``ditscale.kind = trial``, ``mlflow.parentRunId`` = the parent). The writers
(``orchestrator.tracking``, ``orchestrator.study``) and the readers (``analysis.runs``,
``analysis.report``) both import these names from here, so they cannot drift apart. Users
script against them (the MLflow UI, their own queries): renaming one is a breaking change.

This module imports nothing heavy (no torch, no MLflow): the size tables come from
``dit.models`` only when asked for.
"""

from __future__ import annotations

from functools import lru_cache

# ------------------------------------------------------------------------------------------
# Tags
# ------------------------------------------------------------------------------------------

TAG_STUDY = "ditscale.study"  # the study's name, on the parent and on every trial run
TAG_TRIAL = "ditscale.trial"  # the trial's (cell's) name
TAG_KIND = "ditscale.kind"  # KIND_STUDY or KIND_TRIAL
TAG_PARENT = "mlflow.parentRunId"  # a trial run's parent (MLflow's own nesting tag)
TAG_REASON = "ditscale.failure_reason"  # why a trial failed (non-finite loss, workers kept dying)
TAG_RUN_NAME = "mlflow.runName"
TAG_PYTHON = "ditscale.python"
TAG_VERSION_PREFIX = "ditscale.version."  # + package name: ditscale, torch, ray, deepspeed, mlflow
TAG_GIT_COMMIT = "mlflow.source.git.commit"
KIND_STUDY = "study"
KIND_TRIAL = "trial"
# The FID protocol tags of a trial run (written by dit.evaluate.eval_tags) that say whether two
# trials' FIDs compare.
FID_TAGS = ("eval.features", "eval.num_samples")

# ------------------------------------------------------------------------------------------
# Params of a trial run
# ------------------------------------------------------------------------------------------

# The stable params every trial run carries, with the type a reader parses them back to.
TRIAL_PARAM_TYPES: dict[str, type] = {
    "model": str, "patch_size": int, "depth": int, "hidden_size": int, "num_heads": int, "block": str,
    "image_size": int, "gflops": float, "params": int, "global_batch": int, "lr": float, "steps": int,
    "zero_stage": int, "precision": str,
}
TRIAL_PARAMS = tuple(TRIAL_PARAM_TYPES)
INT_PARAMS = tuple(k for k, t in TRIAL_PARAM_TYPES.items() if t is int)
FLOAT_PARAMS = tuple(k for k, t in TRIAL_PARAM_TYPES.items() if t is float)
STR_PARAMS = tuple(k for k, t in TRIAL_PARAM_TYPES.items() if t is str)
# Further params of a trial run (free-form, for the record), and one per grid axis.
EXTRA_TRIAL_PARAMS = ("model_config", "workers", "tokens", "micro_batch", "ema_decay", "seed", "data")
AXIS_PARAM_PREFIX = "axis."

# ------------------------------------------------------------------------------------------
# Metrics (dit.train logs them under these names; the step is the MLflow step)
# ------------------------------------------------------------------------------------------

FID = "eval/fid"
EVAL_PREFIX = "eval/"  # every evaluation metric
LOSS = "train/loss"
COMPUTE_METRIC = "train/compute_gflops"  # training compute so far, from the images consumed
IMAGES_PER_S = "train/images_per_s"
NONFINITE = "failure/nonfinite_loss"  # 1.0 on the step a trial's loss went non-finite
FAILURE_LOSS = "failure/loss"  # the non-finite value itself
DATA_LOST = "failure/data_lost"  # 1.0 on the step a trial found every shard of its data unreadable
SKIPPED_SAMPLES = "data/skipped_samples"  # samples replaced by readable ones so far (all ranks)
BAD_SHARDS = "data/bad_shards"  # distinct damaged shards seen so far (all ranks)

# ------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------

SPEC_ARTIFACT_DIR = "spec"  # the parent run's copy of the spec file
RESOLVED_SPEC_ARTIFACT = "spec/resolved.json"  # the spec with every default filled in
CELLS_ARTIFACT = "cells.json"  # the parent run's table of cells
SAMPLES_ARTIFACT_DIR = "samples"  # a trial run's sample grid per evaluation
REPORT_ARTIFACT_DIR = "report"  # the parent run's report and plots

# ------------------------------------------------------------------------------------------
# Files of a study folder that the readers look for
# ------------------------------------------------------------------------------------------

STUDY_DB_FILE = "mlflow.db"  # the default tracking store, in the study folder (orchestrator.layout)
REPORT_DIR = "report"  # where ``ditscale run`` writes the report, in the study folder

# ------------------------------------------------------------------------------------------
# Model sizes (from dit.models.SIZES, the paper's Table 1)
# ------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def size_order() -> tuple[str, ...]:
    """The paper's size letters, smallest first: ('S', 'B', 'L', 'XL')."""
    from dit.models import SIZES

    return tuple(SIZES)


@lru_cache(maxsize=None)
def size_by_config() -> dict[tuple[int, int], str]:
    """(depth, hidden size) -> size letter, for runs named by a custom config."""
    from dit.models import SIZES

    return {(depth, hidden): size for size, (depth, hidden, _heads) in SIZES.items()}
