"""What DeepSpeed costs per training step on CPU: plain PyTorch vs. DeepSpeed ZeRO-0/2, 1 and 2 workers.

One step = diffusion loss forward (``create_diffusion().training_losses(model, ...)["loss"].mean()``),
backward and an AdamW update, on synthetic random latents (no data loading), global batch 32.
Variants (the DeepSpeed ones built exactly as ``dit.train`` builds them: ``init_distributed`` /
``TrainConfig`` / ``build_engine`` / ``deepspeed_config``, client ``torch.optim.AdamW``):

* ``plain``       -- 1 worker, the model + ``torch.optim.AdamW`` + the same LambdaLR, no DeepSpeed.
* ``ds-z0``       -- 1 worker, DeepSpeed ZeRO-0 fp32 on a one-rank gloo group.
* ``ds-z0+loop``  -- ds-z0 plus the per-step extras of ``dit.train.train``'s loop (step generator,
                     3 ``.item()`` calls, the ``all_reduce`` of the loss sums, ``EMA.update``,
                     ``get_global_grad_norm``).  Shows what a trial pays beyond the engine.
* ``ds-z2``       -- 1 worker, ZeRO-2 (``--no-z2-single`` skips it).
* ``ds-z2 x2``    -- 2 worker processes (spawned, gloo on 127.0.0.1), ZeRO-2, micro batch 16 each
                     (same global batch 32), ``--worker-threads`` torch threads each (default 1,
                     so 2 workers use the machine's 2 cores as a 2-thread single worker does, and
                     as Ray Train's 1-CPU workers get ``OMP_NUM_THREADS=1``). Timed on rank 0,
                     barrier before and after each round.
* ``ds-z0 x2``    -- the same pair with ZeRO-0 (DDP-like all-reduce); ``--pairs`` picks the stages.

The 1-worker variants live in this process; each 2-worker pair lives in two child processes that
wait (idle) on a pipe while the others run. Variants are timed in interleaved rounds (each round:
``--per-round`` steps of every variant, the order rotating), so load from other processes hits all
alike; the table reports medians of the per-step times, a per-phase split
(forward+loss / backward / optimizer step) and the ratio to plain PyTorch, taken per round and
then the median (paired, robust to bursts of outside load).

    .venv/bin/python benchmarks/bench_trial_overhead.py --quick   # < 1 min
    .venv/bin/python benchmarks/bench_trial_overhead.py           # ~2 minutes
    .venv/bin/python benchmarks/bench_trial_overhead.py --patch-size 4   # a cheaper step
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {
    "depth": 4,
    "hidden_size": 128,
    "num_heads": 4,
    "patch_size": 2,
    "input_size": 16,
    "in_channels": 4,
    "num_classes": 10,
}
GLOBAL_BATCH = 32
PHASES = ("fwd", "bwd", "opt")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _train_config(model: dict, zero_stage: int, global_batch: int):
    from dit.train import TrainConfig

    return TrainConfig(
        model=model, data="synthetic", steps=1, global_batch=global_batch,
        zero_stage=zero_stage, precision="fp32", lr=1e-4,
    )


def _batch(model: dict, rank: int, micro: int, step: int, num_timesteps: int):
    """Synthetic latents, labels, timesteps and noise; fresh per step (like a real stream)."""
    g = torch.Generator().manual_seed(1_000_003 * rank + step)
    c, s = model["in_channels"], model["input_size"]
    x = torch.randn(micro, c, s, s, generator=g)
    y = torch.randint(0, model["num_classes"], (micro,), generator=g)
    t = torch.randint(0, num_timesteps, (micro,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return x, y, t, noise


class Runner:
    """One variant: a model (+ engine) and a step function that returns per-phase seconds."""

    def __init__(self, name: str, kind: str, model_spec: dict, rank: int = 0, world: int = 1) -> None:
        from dit.diffusion import create_diffusion
        from dit.models import create_model
        from dit.train import EMA, build_engine

        self.name, self.kind, self.rank, self.world = name, kind, rank, world
        self.diffusion = create_diffusion()
        torch.manual_seed(0)  # identical initial weights in every variant and rank
        self.spec = model_spec
        model = create_model(model_spec).train()
        stage = int(kind.split("-z")[1][0]) if "-z" in kind else 0
        self.cfg = _train_config(model_spec, stage, GLOBAL_BATCH)
        self.micro, accum = self.cfg.accumulation(world)
        assert accum == 1, accum
        self.step_index = 0
        self.ema = None
        if kind == "plain":
            self.model = model
            self.opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=self.cfg.adam_betas,
                                         weight_decay=self.cfg.weight_decay)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        else:
            self.model = build_engine(self.cfg, model, self.micro, accum)
            self.model.train()
            if kind.endswith("+loop"):
                self.ema = EMA(self.model, self.cfg.ema_decay)

    def step(self) -> tuple[float, float, float]:
        import torch.distributed as dist

        x, y, t, noise = _batch(self.spec, self.rank, self.micro, self.step_index,
                                self.diffusion.num_timesteps)
        self.step_index += 1
        t0 = time.perf_counter()
        if self.ema is not None:  # what dit.train's loop does before the forward
            gen = torch.Generator().manual_seed(self.step_index)
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        losses = self.diffusion.training_losses(self.model, x, t, y, noise=noise)
        loss = losses["loss"].mean()
        t1 = time.perf_counter()
        if self.kind == "plain":
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            self.opt.step()
            self.sched.step()
        else:
            self.model.backward(loss)
            t2 = time.perf_counter()
            self.model.step()
        if self.ema is not None:
            sums = torch.tensor([loss.item(), losses["mse"].mean().item(), losses["vb"].mean().item(), 1.0],
                                dtype=torch.float64)
            dist.all_reduce(sums)
            self.ema.update()
            self.model.get_global_grad_norm()
        else:
            loss.item()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2


def _free_port() -> int:
    from dit.train import _free_port as free

    return free()


def _worker(rank: int, world: int, port: int, threads: int, stage: int, model_spec: dict, conn) -> None:
    """A rank of a 2-worker pair: build, then run rounds on request from the parent."""
    try:
        _quiet()
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(threads)
        import torch.distributed as dist

        from dit.train import init_distributed

        init_distributed()
        runner = Runner(f"ds-z{stage} x2", f"ds-z{stage}", model_spec, rank=rank, world=world)
        conn.send(("ready", None))
        while True:
            n = conn.recv()
            if n is None:
                break
            dist.barrier()
            times = [runner.step() for _ in range(n)]
            dist.barrier()
            conn.send(("times", times))
    except Exception as err:  # noqa: BLE001 - surface the failure in the parent instead of hanging it
        import traceback

        conn.send(("error", f"rank {rank}: {err!r}\n{traceback.format_exc()}"))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception as err:  # noqa: BLE001 - exiting anyway
            print(f"rank {rank}: destroy_process_group failed: {err!r}", file=sys.stderr)


class Pair:
    """A 2-process DeepSpeed variant, driven over pipes; times come from rank 0."""

    def __init__(self, threads: int, stage: int, model_spec: dict) -> None:
        import multiprocessing as mp

        self.name = f"ds-z{stage} x2"
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, 2, port, threads, stage, model_spec, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            self._recv(conn)

    def _recv(self, conn):
        if not conn.poll(600):
            raise RuntimeError("2-worker pair: no answer within 600 s")
        tag, value = conn.recv()
        if tag == "error":
            raise RuntimeError(value)
        return value

    def run(self, n: int) -> list[tuple[float, float, float]]:
        for conn in self.conns:
            conn.send(n)
        out = [self._recv(conn) for conn in self.conns]
        return out[0]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (< 1 min)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 25, quick 4)")
    p.add_argument("--per-round", type=int, default=None, help="steps per variant per round (default 3, quick 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (default %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the 1-worker variants (default %(default)s)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="torch threads of each worker of a 2-worker pair (default %(default)s)")
    p.add_argument("--z2-single", action=argparse.BooleanOptionalAction, default=True,
                   help="include 1-worker ZeRO-2 (default on)")
    p.add_argument("--pairs", default=None,
                   help="ZeRO stages of the 2-worker pairs, comma-separated, '' for none "
                        "(default '0,2', quick '2')")
    p.add_argument("--patch-size", type=int, default=TINY["patch_size"],
                   help="patch size of the small DiT (default %(default)s; 4 makes the step ~3x cheaper "
                        "so fixed per-step costs weigh more)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 25)
    args.per_round = args.per_round or (2 if args.quick else 3)
    if args.pairs is None:
        args.pairs = "2" if args.quick else "0,2"
    stages = [int(s) for s in args.pairs.split(",") if s.strip()]
    spec = {**TINY, "patch_size": args.patch_size}
    _quiet()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load0 = load_average()

    pairs: list[Pair] = []
    try:
        for stage in stages:  # spawn first: the children start from a clean process
            pairs.append(Pair(args.worker_threads, stage, spec))
        from dit.train import init_distributed

        init_distributed()  # the one-rank gloo group of the 1-worker engines
        variants: list = [Runner("plain", "plain", spec), Runner("ds-z0", "ds-z0", spec),
                          Runner("ds-z0+loop", "ds-z0+loop", spec)]
        if args.z2_single:
            variants.append(Runner("ds-z2", "ds-z2", spec))
        variants += pairs
        params = sum(p.numel() for p in variants[0].model.parameters())
        print(
            f"torch {torch.__version__}, DiT {spec} ({params / 1e6:.2f} M params), global batch "
            f"{GLOBAL_BATCH}, fp32, synthetic latents; 1-worker variants {args.threads} threads, 2-worker "
            f"pairs {args.worker_threads} thread(s) per worker, micro batch {GLOBAL_BATCH // 2}; "
            f"{args.rounds} rounds x {args.per_round} steps (+{args.warmup} warmup) per variant, interleaved"
        )

        def run(v, n):
            return v.run(n) if isinstance(v, Pair) else [v.step() for _ in range(n)]

        for v in variants:
            run(v, args.warmup)
        times: dict[str, list[tuple[float, float, float]]] = {v.name: [] for v in variants}
        round_med: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for v in order:
                got = run(v, args.per_round)
                times[v.name] += got
                round_med[v.name].append(statistics.median(sum(s) for s in got))
    finally:
        for pair in pairs:
            pair.close()

    base = round_med["plain"]
    header = (f"{'variant':<12} {'workers':>7} {'ms/step':>8} {'min..max':>11} {'steps/s':>8} "
              f"{'fwd':>6} {'bwd':>6} {'opt':>6} {'vs plain':>9}")
    print(header)
    print("-" * len(header))
    for v in variants:
        total = [sum(s) for s in times[v.name]]
        med = statistics.median(total)
        phases = [statistics.median(s[i] for s in times[v.name]) * 1e3 for i in range(3)]
        ratio = statistics.median(o / b for o, b in zip(round_med[v.name], base))
        workers = 2 if isinstance(v, Pair) else 1
        spread = f"{min(total) * 1e3:.0f}..{max(total) * 1e3:.0f}"
        print(f"{v.name:<12} {workers:>7} {med * 1e3:>8.1f} {spread:>11} {1 / med:>8.2f} "
              + " ".join(f"{ph:>6.1f}" for ph in phases) + f" {ratio:>8.2f}x")
    print("ms/step, fwd/bwd/opt: medians over all timed steps (phases: diffusion loss forward / backward, "
          "for DeepSpeed engine.backward incl. its gradient all-reduce / optimizer step + loop extras); "
          "'vs plain': median over rounds of (variant / plain) round medians, >1 = slower")
    print(f"total wall time {time.perf_counter() - start:.1f} s; 1-min load average {load0} at start, "
          f"{load_average()} at end ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
