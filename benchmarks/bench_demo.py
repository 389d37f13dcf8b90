"""The demo study's two promises: it finishes in about ten minutes on a 2-core laptop, and its
cells show the paper's direction, r(log Gflops, final FID) <= -0.8.

Runs the study end to end (local Ray, DeepSpeed, MLflow sqlite, digits FID in the loop) into a
temporary folder, or reads a study folder that already ran (--from). Prints each cell's Gflops,
its FID at every evaluation, the training / evaluation seconds from its metric log, and the
correlations the report also fits.

    python benchmarks/bench_demo.py                     # runs studies/demo.yaml (about 10 minutes)
    python benchmarks/bench_demo.py --from runs/demo    # a finished study folder, no run
    python benchmarks/bench_demo.py --quick             # 3 cells x 200 steps (1-2 minutes; checks the script)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_orchestration import training_seconds  # noqa: E402

WALL_TARGET_S = 600.0
R_TARGET = -0.8


def quick_spec(tmp: Path, spec_path: Path) -> Path:
    spec = yaml.safe_load(spec_path.read_text())
    spec["name"] = "bench-demo-quick"
    spec["data"]["manifest"] = str((spec_path.parent / spec["data"]["manifest"]).resolve())
    spec["grid"]["patch"] = [8, 4]
    spec["grid"]["size"] = spec["grid"]["size"][:2]
    spec["grid"]["exclude"] = [{"size": spec["grid"]["size"][0]["name"], "patch": 4}]
    spec["recipe"].update(steps=200, checkpoint_every=100)
    spec["eval"].update(every=100, num_samples=200, batch_size=100)
    path = tmp / "quick.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def evals(metrics_file: Path) -> list[tuple[int, float, float]]:
    """(step, FID, seconds) of every evaluation in a trial's metric log."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), r["eval/fid"], r.get("eval/seconds", 0.0)) for r in rows if "eval/fid" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "studies" / "demo.yaml"))
    parser.add_argument("--from", dest="folder", help="a study folder that already ran (skips the run)")
    parser.add_argument("--quick", action="store_true", help="3 cells x 200 steps: checks the script, not the law")
    args = parser.parse_args()

    from orchestrator.spec import load_spec

    tmp, wall = None, None
    if args.folder:
        root = Path(args.folder)
        spec_path = root / "spec.yaml"
    else:
        from orchestrator.study import run_study

        tmp = Path(tempfile.mkdtemp(prefix="ditscale-bench-demo-"))
        spec_path = quick_spec(tmp, Path(args.spec)) if args.quick else Path(args.spec)
        t0 = time.perf_counter()
        result = run_study(spec_path, storage=str(tmp / "runs"))
        wall = time.perf_counter() - t0
        root = result.root
    spec = load_spec(spec_path)

    print(f"{'cell':<12} {'Gflops':>9} {'train s':>8} {'eval s':>7}  FID at steps")
    gflops, final = [], []
    train_total = eval_total = 0.0
    for cell in spec.cells():
        log = root / "trials" / cell.name / "metrics.jsonl"
        if not log.is_file():
            print(f"{cell.name:<12} {cell.gflops:>9.5f}  (no metric log)")
            continue
        secs = training_seconds(log, cell.train.global_batch, cell.train.log_every)
        ev = evals(log)
        eval_s = sum(s for _, _, s in ev)
        train_total, eval_total = train_total + secs, eval_total + eval_s
        fids = "  ".join(f"{step}: {fid:7.1f}" for step, fid, _ in ev)
        print(f"{cell.name:<12} {cell.gflops:>9.5f} {secs:>8.1f} {eval_s:>7.1f}  {fids}")
        if ev and ev[-1][0] == cell.train.steps:
            gflops.append(cell.gflops)
            final.append(ev[-1][1])

    print()
    if wall is not None:
        verdict = "met" if wall <= WALL_TARGET_S else "NOT met"
        print(f"study wall time                 {wall:8.1f} s   (target <= {WALL_TARGET_S:.0f} s: {verdict})")
    print(f"training / evaluation seconds   {train_total:8.1f} / {eval_total:.1f}  (summed over trials)")
    if len(final) >= 3:
        lx = np.log(gflops)
        r, p = stats.pearsonr(lx, final)
        r_log, _ = stats.pearsonr(lx, np.log(final))
        verdict = "met" if r <= R_TARGET else "NOT met"
        if args.quick:
            verdict = "--quick trains 200 steps: no law expected"
        print(f"r(log Gflops, final FID)        {r:8.3f}     (p = {p:.2g}; target <= {R_TARGET}: {verdict})")
        print(f"r(log Gflops, log final FID)    {r_log:8.3f}")
        print(f"final FID best / worst          {min(final):8.1f} / {max(final):.1f}   over {len(final)} cells")
    else:
        print("fewer than 3 cells finished with a final FID: no correlation")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
