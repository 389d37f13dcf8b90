"""Test-only faults, injected through ``run_trial(step_callbacks=[...])``.

Each is a picklable callable ``(step, engine)`` that dit's training loop calls after every
completed step on every worker. Ray workers cannot import ``tests/``, so this module is
pickled by value (cloudpickle ships the classes themselves).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from ray import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillAt:
    """SIGKILL rank ``rank`` right after step ``step``, once: the ``marker`` file (written just
    before the kill) remembers across the restart from the last checkpoint."""

    def __init__(self, step: int, marker: str | Path, rank: int = 0):
        self.step, self.marker, self.rank = step, str(marker), rank

    def __call__(self, step: int, engine: Any) -> None:
        import torch.distributed as dist

        marker = Path(self.marker)
        if step == self.step and dist.get_rank() == self.rank and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAt:
    """Fill every weight with NaN after step ``step``: the next step's loss is non-finite."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step: int, engine: Any) -> None:
        import torch

        if step == self.step:
            with torch.no_grad():
                for p in engine.module.parameters():
                    p.fill_(float("nan"))


class RecordSteps:
    """Append every step rank ``rank`` completes to ``path``, one per line: after a restart the
    file shows which checkpoint the group resumed from (the first step after the gap)."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path, self.rank = str(path), rank

    def __call__(self, step: int, engine: Any) -> None:
        import torch.distributed as dist

        if dist.get_rank() == self.rank:
            with open(self.path, "a") as f:
                f.write(f"{step}\n")


class StepFileSink:
    """A metric sink (``run_trial(sinks=[...])``) that appends each step it is handed to a file:
    what any sink, such as MLflow's, receives."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def add(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(f"{int(metrics['step'])}\n")
