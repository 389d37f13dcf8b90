"""Makespan of a study on a GPU cluster: spec order vs cost order (``order_by_cost``).

The runner launches a study's trials in ``orchestrator.spec.order_by_cost`` order (longest
estimated trial first: GPU-hours / the trial's GPUs). This simulates the paper's 12-cell grid
(``studies/dit_paper_256.yaml``: S/B/L/XL on 1/2/4/8 GPUs, durations from the spec's
GPU-hour estimate, perfect scaling over a trial's GPUs) on clusters of G GPUs with list
scheduling: whenever GPUs free up, trials start in the given order as long as they fit.

* ``strict``: a trial that does not fit blocks the ones behind it (FIFO).
* ``backfill``: later trials that fit start ahead of a blocked one (what Ray Tune does when it
  holds placement-group requests for several pending trials).

Orders: ``spec`` (as written), ``compute`` (total training compute descending: GPU-hours,
ignoring how many GPUs share them), ``cost`` (``order_by_cost``), ``random`` (mean over
shuffles). The lower bound is max(total GPU-hours / G, longest trial); ratio = makespan / bound.

    python benchmarks/bench_schedule.py            # 8, 12, 16, 32, 64 GPUs, 100 random orders
    python benchmarks/bench_schedule.py --quick    # 8, 16, 64 GPUs, 20 random orders
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.spec import load_spec, order_by_cost  # noqa: E402

ORDERS = ("spec", "compute", "cost", "random")


def makespan(jobs: list[tuple[str, float, float]], gpus: float, backfill: bool) -> float:
    """jobs: (name, gpus needed, wall hours) in launch order. Returns the finish time."""
    for name, need, _ in jobs:
        if need > gpus:
            raise ValueError(f"{name} needs {need} GPUs, the cluster has {gpus}")
    pending = list(jobs)
    running: list[tuple[float, float]] = []  # (end time, gpus)
    now, free = 0.0, gpus
    while pending or running:
        i = 0
        while i < len(pending):
            _, need, hours = pending[i]
            if need <= free:
                pending.pop(i)
                free -= need
                heapq.heappush(running, (now + hours, need))
            elif backfill:
                i += 1
            else:
                break
        end, need = heapq.heappop(running)
        now, free = end, free + need
        while running and running[0][0] == now:
            free += heapq.heappop(running)[1]
    return now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spec", default=str(ROOT / "studies" / "dit_paper_256.yaml"))
    args = parser.parse_args()
    clusters = [8, 16, 64] if args.quick else [8, 12, 16, 32, 64]
    shuffles = 20 if args.quick else 100

    cells = load_spec(args.spec).cells()

    def jobs(order):
        return [(c.name, c.gpus, c.wall_hours) for c in order]

    total = sum(c.gpu_hours for c in cells)
    longest = max(c.wall_hours for c in cells)
    print(f"{args.spec}: {len(cells)} trials, {total:.1f} GPU-h in all, longest trial {longest:.1f} h")
    print("cost order:", ", ".join(f"{c.name}({c.gpus:g})" for c in order_by_cost(cells)))
    print()
    head = f"{'GPUs':>5} {'policy':<9} {'bound h':>8}" + "".join(f" {o + ' h':>10} {'ratio':>6}" for o in ORDERS)
    print(head)
    print("-" * len(head))
    rng = random.Random(0)
    for g in clusters:
        bound = max(total / g, longest)
        for backfill in (False, True):
            times = [
                makespan(jobs(cells), g, backfill),
                makespan(jobs(sorted(cells, key=lambda c: -c.compute_gflops)), g, backfill),
                makespan(jobs(order_by_cost(cells)), g, backfill),
                statistics.mean(makespan(jobs(rng.sample(cells, len(cells))), g, backfill) for _ in range(shuffles)),
            ]
            print(
                f"{g:>5} {'backfill' if backfill else 'strict':<9} {bound:>8.1f}"
                + "".join(f" {t:>10.1f} {t / bound:>6.2f}" for t in times)
            )
    print("\nhours = wall-clock hours (GPU-hours / GPUs per trial); ratio = makespan / lower bound;")
    print(f"random = mean over {shuffles} shuffled orders.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
