"""``ditscale run SPEC``, ``ditscale resume SPEC`` and ``ditscale status SPEC``."""

from __future__ import annotations

import argparse
import math


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="study spec (YAML)")
    parser.add_argument("--storage", help="storage root (default: the spec's storage, else ./runs)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: spec, MLFLOW_TRACKING_URI, "
                        "else a sqlite file in the study folder)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")


def _print_outcome(result) -> None:
    state = "cancelled" if result.cancelled else "finished" if result.ok else "not all cells finished"
    print(f"study {result.name}: {state}")
    for cell, outcome in result.outcomes.items():
        status = outcome["status"] if outcome else "not run"
        reason = f" ({outcome['reason']})" if outcome and outcome.get("reason") else ""
        print(f"  {cell:<28} {status}{reason}")
    print(f"study folder: {result.root}")
    from analysis.store import redact_uri

    print(f"MLflow: {redact_uri(result.tracking_uri)}  (parent run {result.parent_run_id})")
    if result.tracking_uri.startswith("sqlite:"):
        print(f"  browse with: mlflow ui --backend-store-uri {result.tracking_uri}")


def _run(args: argparse.Namespace, resume: bool) -> int:
    from orchestrator.study import run_study

    result = run_study(args.spec, storage=args.storage, tracking_uri=args.tracking_uri,
                       address=args.address, resume=resume)
    if result.already_ended:
        print(f"study {result.name}: every cell had already ended; nothing to run")
    _print_outcome(result)
    if not args.no_report:
        _maybe_report(result)
    return 0 if result.ok else 1


def _maybe_report(result) -> None:
    try:
        from analysis.report import write_study_report
    except ImportError:  # the analysis package has no report yet
        return
    path = write_study_report(result)
    print(f"report: {path}")


def main(args: argparse.Namespace) -> int:
    return _run(args, resume=False)


def resume_main(args: argparse.Namespace) -> int:
    return _run(args, resume=True)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="study spec (YAML)")
    parser.add_argument("--storage", help="storage root (default: the spec's storage)")


def status_main(args: argparse.Namespace) -> int:
    from orchestrator.study import study_status

    from orchestrator.progress import format_eta, format_flops

    rows = study_status(args.spec, args.storage)
    print(f"{'cell':<28} {'per image':>12} {'status':<9} {'step':>15} {'loss':>8} {'FID':>8} {'ETA':>6}")
    for r in rows:
        loss = "" if math.isnan(r["loss"]) else f"{r['loss']:.4f}"
        fid = "" if r["fid"] is None else f"{r['fid']:.2f}"
        eta = format_eta(r["eta_s"]) if r["status"] == "started" else ""
        print(f"{r['cell']:<28} {format_flops(r['gflops']):>12} {r['status']:<9} {r['step']:>7}/{r['steps']:<7} "
              f"{loss:>8} {fid:>8} {eta:>6}" + (f"  {r['reason']}" if r["reason"] else ""))
    return 0


def cancel_main(args: argparse.Namespace) -> int:
    from orchestrator.study import cancel_study

    path = cancel_study(args.spec, args.storage)
    print(f"cancel requested ({path}); the running driver stops its trials at their next report. "
          "`ditscale resume` continues the study from its checkpoints.")
    return 0
