"""Live progress and cancellation of a running study, both read from the study folder.

The trials' controllers append each step's metrics to ``trials/<cell>/metrics.jsonl``; the
driver prints one line per running trial from those files (on a terminal only), and a
``CANCEL`` file written by ``ditscale cancel`` stops the study through a Tune stopper, on
whatever host the driver runs, as long as the folder is shared.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from analysis.schema import BAD_SHARDS, FID, IMAGES_PER_S, LOSS
from analysis.units import format_flops  # noqa: F401 -- re-exported: the CLI prints with it from here
from orchestrator.layout import CANCEL_FILE, OUTCOME_FILE, last_metrics


def eta_seconds(metrics: dict[str, Any], steps: int, global_batch: int) -> float | None:
    rate = metrics.get(IMAGES_PER_S)
    if not rate:
        return None
    return max(0, steps - int(metrics.get("step", 0))) * global_batch / rate


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 90 else f"{seconds:.0f}s"


def damage_note(metrics: dict[str, Any]) -> str:
    """'3 damaged shards skipped' once a trial's workers skipped any (the warning's only way out
    of the workers: their metrics), else ''."""
    n = int(metrics.get(BAD_SHARDS) or 0)
    return f"{n} damaged shard{'s' if n != 1 else ''} skipped" if n else ""


def progress_line(cell: str, metrics: dict[str, Any], steps: int, global_batch: int) -> str:
    step = int(metrics.get("step", 0))
    fid, damage = metrics.get(FID), damage_note(metrics)
    return (
        f"  {cell:<28} step {step:>7}/{steps:<7} loss {metrics.get(LOSS, float('nan')):.4f}"
        f"  {metrics.get(IMAGES_PER_S, 0.0):8.1f} img/s"
        + (f"  FID {fid:.2f}" if fid is not None else "")
        + f"  ETA {format_eta(eta_seconds(metrics, steps, global_batch))}"
        + (f"  ({damage})" if damage else "")
    )


class ProgressPrinter:
    """Prints running trials every ``interval`` seconds while a study runs (TTY only)."""

    def __init__(self, trials_dir: Path, cells: list[Any], interval: float = 15.0,
                 stream: TextIO | None = None, force: bool = False):
        self.trials_dir, self.cells, self.interval = trials_dir, cells, interval
        self.stream = stream or sys.stdout
        self.enabled = force or self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def snapshot(self) -> list[str]:
        lines = []
        for cell in self.cells:
            trial = self.trials_dir / cell.name
            if (trial / OUTCOME_FILE).is_file():
                continue
            metrics = last_metrics(trial)
            if metrics:
                lines.append(progress_line(cell.name, metrics, cell.train.steps, cell.train.global_batch))
        return lines

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            lines = self.snapshot()
            if lines:
                print(time.strftime("%H:%M:%S") + " running:", *lines, sep="\n", file=self.stream, flush=True)


def make_cancel_stopper(root: Path):
    """A Tune stopper that ends the whole study once ``root/CANCEL`` exists."""
    from ray import tune

    class CancelStopper(tune.Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            return (root / CANCEL_FILE).exists()

    return CancelStopper()


def request_cancel(root: Path, reason: str = "cancelled by user") -> Path:
    path = root / CANCEL_FILE
    path.write_text(json.dumps({"reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return path
