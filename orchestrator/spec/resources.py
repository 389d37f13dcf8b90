"""What a trial runs on, declared once: :class:`WorkerResources`.

``WorkerResources`` is the one declaration of a trial's workers, CPUs and GPUs. The spec's
``resources`` section (:class:`Resources`) extends it with study-wide settings, its
``by_size`` entries (:class:`SizeResources`) are the same fields all optional (derived from
``WorkerResources``, so a constraint lives in one place), every :class:`~orchestrator.spec.cells.Cell`
holds one, and ``TrialConfig`` (``ditscale train``) subclasses it.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from pydantic import BaseModel, Field, create_model

from orchestrator.spec.base import _Strict


class WorkerResources(_Strict):
    workers: int = Field(1, ge=1, description="Ray Train workers (processes) per trial")
    cpus_per_worker: float = Field(1.0, gt=0)  # fractional on a laptop: 2 workers fit 2 cores
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0)

    def worker_bundle(self) -> dict[str, float]:
        """One worker's Ray resource request: {"CPU": cpus_per_worker} plus "GPU" with use_gpu.

        What Ray Train asks each worker's node for, so it is also what a node must have free
        to host one worker of the trial (a cell no node can fit never starts)."""
        bundle = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            bundle["GPU"] = self.gpus_per_worker
        return bundle


def _override_model() -> type[BaseModel]:
    """WorkerResources' fields, each optional (default None: keep the study-wide value), same bounds."""
    fields: dict[str, Any] = {}
    for name, info in WorkerResources.model_fields.items():
        info = copy.copy(info)
        info.default = None
        info.description = None
        fields[name] = (Optional[info.annotation], info)
    return create_model("SizeResources", __base__=_Strict, **fields)


SizeResources = _override_model()


class Resources(WorkerResources):
    by_size: dict[str, SizeResources] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides by model size, e.g. {XL: {workers: 8}, L: {workers: 4}}"
    )
    max_failures: int = Field(2, ge=0, description="worker-group restarts per trial")
    keep_checkpoints: int = Field(2, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: derived by the runner")

    def with_override(self, override: SizeResources | None) -> WorkerResources:  # type: ignore[valid-type]
        """The study-wide WorkerResources with a size's ``by_size`` override applied."""
        values = self.model_dump(include=set(WorkerResources.model_fields))
        if override is not None:
            values.update(override.model_dump(exclude_none=True))
        return WorkerResources.model_validate(values)
