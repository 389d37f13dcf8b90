"""``ditscale train CONFIG.yaml``: one trial, e.g. to debug a single cell of a study."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="trial YAML: name, train (the recipe), workers, storage, ...")
    parser.add_argument("--storage", help="override the storage folder / URI")
    parser.add_argument("--workers", type=int, help="override the number of workers")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def main(args: argparse.Namespace) -> int:
    from analysis.schema import LOSS
    from orchestrator.spec.trial import load_trial_config
    from orchestrator.trial import run_trial

    cfg = load_trial_config(args.config, storage=args.storage, workers=args.workers)
    outcome = run_trial(cfg, address=args.address)
    last = outcome.metrics[-1] if outcome.metrics else {}
    print(
        f"trial {outcome.name}: {outcome.status} at step {outcome.last_step}"
        + (f" (loss {last[LOSS]:.4f})" if LOSS in last else "")
        + (f": {outcome.reason}" if outcome.reason else "")
    )
    if outcome.checkpoint:
        print(f"checkpoint: {outcome.checkpoint}")
    return 0 if outcome.status == "finished" else 1

