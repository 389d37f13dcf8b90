"""``ditscale fit [STUDY | --csv FILE] --x COL --y COL [--law power|saturating|envelope] ...``.

Fits one scaling law and prints it (``--json``: the stable keys documented in
``analysis.laws``). STUDY is resolved like ``ditscale report``: a spec file, a study folder, a
study name or a parent run id.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", help="study spec (YAML), study folder, name or parent run id")
    parser.add_argument("--csv", metavar="FILE", help="a CSV of evaluations instead of a study (one row each)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI of the study (default as in `report`)")
    parser.add_argument("--x", default="gflops", help="x column (default gflops; 'compute' = training compute)")
    parser.add_argument("--y", default="fid", help="y column (default fid: eval/fid, or the CSV's first fid* column)")
    parser.add_argument("--group", help="column naming each model or training curve (default: model, else trial)")
    parser.add_argument("--law", choices=("power", "saturating", "envelope"), default="power",
                        help="power: ln y = a + b ln x at one step; saturating: y = E + A C^-alpha on the "
                        "compute frontier; envelope: y = E + A N^-a + B D^-b over whole training curves")
    parser.add_argument("--holdout", metavar="VALUE", help="fit without this group (a value of --group, or "
                        "'largest') and predict it")
    parser.add_argument("--predict", metavar="MODEL@STEPS", help="predict a model after STEPS steps "
                        "(e.g. DiT-XL/2@400K; MODEL may be a Gflops number)")
    parser.add_argument("--batch", type=int, help="global batch for --predict's STEPS (default: the data's)")
    parser.add_argument("--step", type=int, help="power law: the training step to fit at (default: the step "
                        "most models reached)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _load(args: argparse.Namespace):
    """The frame to fit, where it came from, and the study's cells that have no value to fit."""
    from analysis.laws import read_csv, study_frame
    from dit.errors import ConfigError

    if args.csv and args.study:
        raise ConfigError("give a STUDY or --csv FILE, not both")
    if args.csv:
        return read_csv(args.csv), f"csv:{args.csv}", []
    if not args.study:
        raise ConfigError("name a STUDY (spec, folder, name or run id) or give --csv FILE")
    from analysis.runs import load_study
    from orchestrator.cli.report import resolve_study

    name, uri, _ = resolve_study(args.study, args.tracking_uri)
    data = load_study(name, uri)
    return study_frame(data, args.law), f"study:{data.name}", _left_out(data, args.y)


def _left_out(data: Any, y: str) -> list[dict[str, str]]:
    """Cells with no value of ``y`` at all (failed, not started, or no evaluation yet)."""
    from analysis.laws import column

    try:
        col = column(data.evals, y, "--y")
        have = set(data.evals.dropna(subset=[col])["trial"].astype(str))
    except Exception:  # noqa: BLE001 -- no such column: every cell lacks it
        have = set()
    out = []
    for _, row in data.trials.iterrows():
        if str(row["trial"]) not in have:
            out.append({"label": str(row["model"] if isinstance(row["model"], str) else row["trial"]),
                        "reason": f"no {y} (status {str(row['status']).lower()})"})
    return out


def _clean(value: Any) -> Any:
    """JSON without NaN (not valid JSON): NaN and inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(args: argparse.Namespace) -> int:
    from analysis.laws import FitRequest, run_fit
    from dit.errors import ConfigError

    if args.n_boot < 0:
        raise ConfigError(f"--n-boot must be >= 0 (got {args.n_boot})")
    frame, source, left_out = _load(args)
    req = FitRequest(law=args.law, x=args.x, y=args.y, group=args.group, holdout=args.holdout,
                     predict=args.predict, batch=args.batch, step=args.step, n_boot=args.n_boot,
                     seed=args.seed, level=args.level)
    out = run_fit(frame, req, source=source)
    out.result["excluded"] = list(out.result.get("excluded", [])) + left_out
    if args.json:
        print(json.dumps(_clean(out.result), indent=2, allow_nan=False))
        return 0
    print(out.text)
    for item in left_out:
        print(f"  left out {item['label']}: {item['reason']}")
    return 0
