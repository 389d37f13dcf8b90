"""Orchestration overhead of a study: wall time against the trials' own training time.

Runs a study end to end (local Ray, MLflow sqlite) and reads back each trial's metric log:
training seconds of a trial = sum over its report windows of images / (images per second).
overhead = wall / (sum of training seconds / concurrency) - 1. Everything that is not a
training step counts as overhead here: Ray and Tune start-up, each TorchTrainer's worker group
and DeepSpeed set-up, checkpoints, in-loop evaluation and MLflow logging.

    python benchmarks/bench_orchestration.py            # the demo study (minutes)
    python benchmarks/bench_orchestration.py --quick    # a 2-cell, 40-step study (about a minute)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def quick_spec(tmp: Path) -> Path:
    spec = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    spec["name"] = "bench-quick"
    spec["data"]["manifest"] = str(ROOT / "data" / "digits16" / "manifest.json")
    spec["grid"] = {"size": [{"name": "xs", "depth": 2, "hidden_size": 32, "num_heads": 2}], "patch": [4, 8]}
    spec["recipe"].update(steps=40, checkpoint_every=20, log_every=10)
    spec["eval"] = {"enabled": False}
    path = tmp / "quick.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def training_seconds(metrics_file: Path, global_batch: int, log_every: int) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    seconds, prev = 0.0, 0
    for row in rows:
        steps = int(row["step"]) - prev
        prev = int(row["step"])
        if row.get("train/images_per_s"):
            seconds += steps * global_batch / row["train/images_per_s"]
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "studies" / "demo.yaml"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from orchestrator.spec import load_spec
    from orchestrator.study import max_concurrent, run_study

    tmp = Path(tempfile.mkdtemp(prefix="ditscale-bench-"))
    spec_path = quick_spec(tmp) if args.quick else Path(args.spec)
    spec = load_spec(spec_path)
    t0 = time.perf_counter()
    result = run_study(spec_path, storage=str(tmp / "runs"))
    wall = time.perf_counter() - t0
    cells = spec.cells()
    concurrency = max_concurrent(cells, spec.resources.max_concurrent_trials)
    rows, total = [], 0.0
    for cell in cells:
        secs = training_seconds(result.root / "trials" / cell.name / "metrics.jsonl",
                                cell.train.global_batch, cell.train.log_every)
        rows.append((cell.name, secs))
        total += secs
    ideal = total / concurrency
    print(f"{'cell':<16} {'training s':>10}")
    for name, secs in rows:
        print(f"{name:<16} {secs:>10.1f}")
    print(f"\nstudy wall time            {wall:8.1f} s   ({'all finished' if result.ok else 'NOT all finished'})")
    print(f"sum of training time       {total:8.1f} s   over {len(cells)} trials")
    print(f"concurrency                {concurrency:8d}")
    print(f"ideal wall (sum / conc.)   {ideal:8.1f} s")
    print(f"orchestration overhead     {100 * (wall / ideal - 1):7.0f} %   (target < 5 %)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
