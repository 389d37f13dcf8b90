"""The per-worker training loop: one DiT, one DeepSpeed engine, one latent stream.

Knows nothing of Ray or MLflow. The caller passes a ``report(metrics, checkpoint_dir)``
callback that every rank calls the same number of times (Ray Train's report is a barrier),
and optionally a checkpoint directory to resume from.

Exact resume: every random draw of step ``s`` on rank ``r`` comes from generators seeded with
(seed, rank, s), and the data stream is restarted at the micro-batch it had reached, so a
run resumed from step ``s`` repeats the uninterrupted run's steps after ``s`` bit for bit
(on the same hardware and worker count).

Evaluation (``cfg.eval``, see ``dit.evaluate``): every ``eval.every`` steps and at the end,
all ranks sample with a copy of the EMA weights, compute features and all-reduce their
sums; rank 0's FID (``eval/fid``, ...) joins that step's training metrics in the same
``report`` call. Evaluation is seeded and never touches the training RNG or data stream, so
exact resume holds with it on. With ``sample_dir``, rank 0 also saves a PNG grid of samples
per evaluation there (``samples_step<NNNNNNNN>.png``, written before that step's report).

Modules: :mod:`~dit.train.config` (the recipe), :mod:`~dit.train.engine` (process group,
DeepSpeed), :mod:`~dit.train.ema`, :mod:`~dit.train.checkpoint` (the checkpoint folder's
layout, its only owner), :mod:`~dit.train.loop` (:func:`train`; its ``step_callbacks`` are
the loop's extension point).
"""

from dit.evaluate.grids import sample_grid_path
from dit.train.checkpoint import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_STATE,
    DS_TAG,
    EMA_FILE,
    Checkpoint,
    CheckpointWriteError,
    checkpoint_name,
    export_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint_files,
)
from dit.train.config import TrainConfig, make_diffusion, resolve_model
from dit.train.ema import EMA, copy_ema
from dit.train.engine import _free_port, build_engine, deepspeed_config, init_distributed
from dit.train.loop import NonFiniteLoss, Report, StepCallback, TrainResult, open_stream, train

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_STATE",
    "DS_TAG",
    "EMA",
    "EMA_FILE",
    "Checkpoint",
    "CheckpointWriteError",
    "NonFiniteLoss",
    "Report",
    "StepCallback",
    "TrainConfig",
    "TrainResult",
    "build_engine",
    "checkpoint_name",
    "copy_ema",
    "deepspeed_config",
    "export_checkpoint",
    "init_distributed",
    "load_checkpoint",
    "make_diffusion",
    "open_stream",
    "resolve_model",
    "sample_grid_path",
    "save_checkpoint",
    "train",
    "verify_checkpoint_files",
]
