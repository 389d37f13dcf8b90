"""``ditscale report [STUDY] [--published CSV]``: fitted scaling laws, plots and a report."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


FIT_NAMES = {"gflops": "FID vs Gflops", "compute": "FID vs compute", "backtest": "backtests",
             "envelope": "compute-optimal frontier", "isoflop": "isoFLOP profiles", "losses": "loss laws"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", help="study spec (YAML), study folder, study name or parent run id "
                        "(omit for a published table alone)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                        "runs/STUDY/mlflow.db when that exists)")
    parser.add_argument("--out", help="output folder (default: runs/STUDY/report when that folder exists, "
                        "else ./STUDY-report)")
    parser.add_argument("--format", choices=("html", "md"), default="html",
                        help="self-contained HTML (default) or Markdown with the plots beside it")
    parser.add_argument("--published", metavar="CSV",
                        help="a published results table to fit and plot beside the study, or alone "
                        "('paper' = the DiT paper's Table 4 shipped with ditscale)")
    parser.add_argument("--step", type=int, help="training step for FID vs Gflops (default: the step most "
                        "trials have evaluated)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the study's MLflow run")


def _default_out(name: str) -> Path:
    from analysis.schema import REPORT_DIR

    folder = Path("runs") / name
    if folder.is_dir():
        return folder / REPORT_DIR
    return Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") + "-report")


def resolve_study(study: str, tracking_uri: str | None) -> tuple[str, str | None, Path | None]:
    """The study's name, tracking URI and folder from what the user typed: a spec file (like
    ``status`` and ``resume``: the spec names the study, its folder and its tracking store), a
    study folder (its study.json and mlflow.db), or a name / parent run id (as given)."""
    from orchestrator.layout import MLFLOW_DB, STATE_FILE

    if study.endswith((".yaml", ".yml")) and Path(study).is_file():
        from orchestrator.spec import load_spec
        from orchestrator.study import study_paths
        from orchestrator.tracking import resolve_tracking_uri

        spec = load_spec(study)
        root = study_paths(spec, None).root
        if not tracking_uri and root.is_dir():
            tracking_uri = resolve_tracking_uri(None, spec.tracking.uri, root)
        return spec.name, tracking_uri, root
    folder = Path(study)
    if (folder / STATE_FILE).is_file():
        import json

        name = json.loads((folder / STATE_FILE).read_text()).get("name") or folder.name
        if not tracking_uri and (folder / MLFLOW_DB).is_file():
            tracking_uri = f"sqlite:///{(folder / MLFLOW_DB).resolve()}"
        return str(name), tracking_uri, folder
    return study, tracking_uri, None


def main(args: argparse.Namespace) -> int:
    from analysis.report import build_report, log_report
    from analysis.runs import load_published, load_study
    from dit.errors import ConfigError

    if not args.study and not args.published:
        raise ConfigError("name a STUDY (and --tracking-uri), or give --published CSV for a published table alone")
    if args.n_boot < 0:
        raise ConfigError(f"--n-boot must be >= 0 (got {args.n_boot})")
    if args.study:
        args.study, args.tracking_uri, root = resolve_study(args.study, args.tracking_uri)
        args.out = args.out or (str(root / "report") if root is not None else None)
    published = None
    if args.published:
        published = load_published(None if args.published == "paper" else args.published)
    data = load_study(args.study, args.tracking_uri) if args.study else published
    out = Path(args.out) if args.out else _default_out(data.name if args.study else "published")
    report = build_report(data, out, fmt=args.format, published=published if args.study else None,
                          step=args.step, n_boot=args.n_boot, n_boot_saturating=args.n_boot, seed=args.seed)
    for analysis in report.analyses:
        print(f"== {analysis.data.name}")
        for fit in (analysis.gflops, analysis.loo, analysis.compute, analysis.envelope, analysis.isoflop):
            if fit is not None:
                print(fit.summary())
        for what, why in analysis.errors.items():
            if what == "gflops" or why != analysis.errors.get("gflops"):
                print(f"  ({FIT_NAMES.get(what, what)}: {why})")
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.path}")
    if args.study and not args.no_log:
        run_id = log_report(report, data)
        print(f"logged to MLflow run {run_id} under report/")
    return 0
