"""Cells: one trial of a study each (model, block, full recipe, resources), their costs and run order."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

from dit.flops import FLOPS_PER_MAC, TRAIN_PASSES, measure
from dit.models import DiTConfig
from dit.train import TrainConfig, resolve_model
from orchestrator.spec.data import DataInfo
from orchestrator.spec.resources import WorkerResources
from orchestrator.spec.trial import TrialConfig


@cache
def _measure(cfg: DiTConfig) -> tuple[float, int]:
    report = measure(cfg, input_size=cfg.input_size)  # builds on the meta device: fast
    return report.gflops, report.params


@dataclass(frozen=True)
class Cell:
    """One trial of a study: a model, a block, a full recipe and its resources."""

    name: str
    model: str | dict[str, Any]
    block: str
    train: TrainConfig
    resources: WorkerResources
    axes: dict[str, Any]  # size, patch, block and the recipe axes: the values that define the cell
    size: str
    patch_size: int
    data: DataInfo
    max_failures: int = 2
    keep_checkpoints: int = 2
    gpu_hour_tflops: float = 400.0

    @property
    def workers(self) -> int:
        return self.resources.workers

    @property
    def cpus_per_worker(self) -> float:
        return self.resources.cpus_per_worker

    @property
    def use_gpu(self) -> bool:
        return self.resources.use_gpu

    @property
    def gpus_per_worker(self) -> float:
        return self.resources.gpus_per_worker

    def worker_bundle(self) -> dict[str, float]:
        """One worker's Ray resources, e.g. {"CPU": 4.0, "GPU": 1.0}; ``workers`` such bundles make a trial."""
        return self.resources.worker_bundle()

    def model_config(self) -> DiTConfig:
        """The DiTConfig the trainer will build (data shape and classes filled in)."""
        d = self.data
        manifest = SimpleNamespace(latent_shape=(d.channels, d.latent_size, d.latent_size), num_classes=d.num_classes)
        return resolve_model(self.train, manifest)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def tokens(self) -> int:
        return self.model_config().num_tokens

    @property
    def gflops(self) -> float:
        """Forward Gflops at batch 1 (fvcore; cached per model config)."""
        return _measure(self.model_config())[0]

    @property
    def params(self) -> int:
        return _measure(self.model_config())[1]

    @property
    def compute_gflops(self) -> float:
        """Training compute, the paper's way: Gflops x global_batch x steps x 3.

        ``dit.flops.training_compute`` by definition, multiplied out in this order so the value
        stays bit-identical: it is part of ``StudySpec.resolved()``, whose hash is how a study
        folder recognises its spec on resume (``training_compute(gflops, batch * steps)`` rounds
        differently in the last bit).
        """
        return self.gflops * self.train.global_batch * self.train.steps * TRAIN_PASSES

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker if self.use_gpu else 0.0

    @property
    def gpu_hours(self) -> float:
        """Estimated GPU-hours at ``cost.gpu_hour_tflops`` (perfect scaling over workers)."""
        return self.compute_gflops * 1e9 * FLOPS_PER_MAC / (self.gpu_hour_tflops * 1e12) / 3600

    @property
    def wall_hours(self) -> float:
        """gpu_hours spread over the trial's GPUs (or workers, on CPU)."""
        return self.gpu_hours / max(self.gpus or self.workers, 1e-9)

    def trial_config(self, storage: str) -> TrialConfig:
        return TrialConfig(
            name=self.name,
            train=self.train,
            **self.resources.model_dump(),
            storage=storage,
            max_failures=self.max_failures,
            keep_checkpoints=self.keep_checkpoints,
        )

    def to_dict(self, costs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "model": copy.deepcopy(self.model),
            "size": self.size,
            "patch_size": self.patch_size,
            "block": self.block,
            "axes": dict(self.axes),
            **self.resources.model_dump(),  # workers, cpus_per_worker, use_gpu, gpus_per_worker
            "train": self.train.model_dump(mode="json"),
            "model_config": self.model_config().to_dict(),
        }
        if costs:
            out.update(
                tokens=self.tokens,
                gflops=self.gflops,
                params=self.params,
                compute_gflops=self.compute_gflops,
                gpu_hours=self.gpu_hours,
            )
        return out


def order_by_cost(cells: Iterable[Cell]) -> list[Cell]:
    """Longest trial first (estimated wall time = GPU-hours / the trial's GPUs, or / workers
    on CPU); ties by training compute, then spec order (stable).

    The runner launches trials in this order (list scheduling, longest-processing-time
    rule): the long trials start early and the short ones fill the gaps at the end. Ordering
    by total compute alone is worse when sizes get different GPU counts (a 4-GPU DiT-L/2
    runs longer than an 8-GPU DiT-XL/2): see ``benchmarks/bench_schedule.py``.
    """
    return sorted(cells, key=lambda c: (-c.wall_hours, -c.compute_gflops))
