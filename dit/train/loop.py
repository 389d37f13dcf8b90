"""The training loop of one worker, and the metric window behind its reports."""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dit.dist import all_reduce_sum
from dit.errors import ConfigError
from dit.evaluate.evaluator import Evaluator
from dit.evaluate.grids import sample_grid_path
from dit.flops import FLOPS_PER_MAC, training_compute
from dit.latents.manifest import NoReadableShardsError
from dit.models import DiTConfig, create_model
from dit.train.checkpoint import load_checkpoint, save_checkpoint, staging_dir
from dit.train.config import TrainConfig, make_diffusion, resolve_model
from dit.train.ema import EMA, copy_ema
from dit.train.engine import build_engine, init_distributed

__all__ = ["BAD_SHARDS", "SKIPPED_SAMPLES", "NonFiniteLoss", "Report", "StepCallback", "TrainResult", "open_stream",
           "train"]

Report = Callable[[dict[str, float], "str | None"], None]
StepCallback = Callable[[int, Any], None]

# Data damage, in every logged step's metrics: workers' warnings never reach the driver (Ray
# runs without log_to_driver), metrics do, into metrics.jsonl and MLflow. Both are running
# totals over all ranks: samples replaced so far, and distinct damaged shards seen so far.
SKIPPED_SAMPLES = "data/skipped_samples"
BAD_SHARDS = "data/bad_shards"


@dataclass
class TrainResult:
    step: int
    images_seen: int
    final_loss: float
    checkpoint_dir: str | None
    metrics: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the trial stops at once with the step and the value."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}; stopping the trial")
        self.step, self.value = step, value


@dataclass
class _Worker:
    """What this rank trains: built once by :func:`_setup`, in the order that fixes the weights."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    micro: int
    accum: int
    manifest: Any
    mcfg: DiTConfig
    gflops: float
    engine: Any
    ema: EMA
    diffusion: Any


def _setup(cfg: TrainConfig, gflops: float | None) -> _Worker:
    from dit.flops import count_gflops
    from dit.latents import Manifest

    rank, world, device = init_distributed()
    if cfg.precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    micro, accum = cfg.accumulation(world)
    manifest = Manifest.load(cfg.data)
    mcfg = resolve_model(cfg, manifest)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(mcfg)
    if gflops is None:
        gflops = count_gflops(model, mcfg.input_size, mcfg.in_channels)
    engine = build_engine(cfg, model, micro, accum)
    ema = EMA(engine, cfg.ema_decay)
    return _Worker(cfg, rank, world, device, micro, accum, manifest, mcfg, gflops, engine, ema, make_diffusion(cfg))


def _step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63))
    return g


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def open_stream(cfg: TrainConfig, micro: int, rank: int, world: int, start_batch: int):
    from dit.latents import LatentStream

    return LatentStream(
        cfg.data,
        micro,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        random_flip=cfg.random_flip,
        num_workers=cfg.loader_workers,
        start_batch=start_batch,
        strict=cfg.strict_data,
    )


def _next_batch(batches, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The next micro-batch; when the data is gone the trial ends here, saying at which step
    (the stream raises instead of handing out empty batches forever)."""
    try:
        return next(batches)
    except NoReadableShardsError as err:
        stop = NoReadableShardsError(f"step {step + 1}: {err}; stopping the trial")
        stop.step = step + 1  # type: ignore[attr-defined]  # the trial's last (failed) step, for its report
        raise stop from err


def micro_batch_losses(diffusion, model, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """The hybrid loss of one micro-batch, its timesteps and noise drawn from ``gen``.

    The diffusion arithmetic (q_sample, the MSE target, the bound) stays in fp32 under bf16
    weights: the latents and noise are never cast to the model's dtype here; the model casts
    its own input, and the diffusion widens its output back.
    """
    x, y = x.to(device, torch.float32), y.to(device)
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device, generator=gen)
    noise = torch.randn(x.shape, device=device, dtype=torch.float32, generator=gen)
    return diffusion.training_losses(model, x, t, y, noise=noise)


def _optimizer_step(w: _Worker, batches, step: int) -> torch.Tensor:
    """One optimizer step (``accum`` micro-batches); the global [loss, mse, vb, count] sums.
    Every draw comes from the (seed, rank, step) generator: the basis of exact resume."""
    gen = _step_generator(w.cfg.seed, w.rank, step, w.device)
    # The generator lives on the worker's device: a draw from it must too (a CUDA generator
    # cannot fill a CPU tensor).
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device)))  # label dropout
    device, diffusion, engine = w.device, w.diffusion, w.engine
    sums = torch.zeros(4, dtype=torch.float64)
    for _ in range(w.accum):
        x, y = _next_batch(batches, step)
        losses = micro_batch_losses(diffusion, engine, x, y, gen, device)
        loss = losses["loss"].mean()
        engine.backward(loss)
        engine.step()
        sums += torch.tensor(
            [loss.item(), losses["mse"].mean().item(), losses["vb"].mean().item(), 1.0],
            dtype=torch.float64,
        )
    sums = all_reduce_sum(sums)  # every rank sees the global mean, so all stop together on NaN
    mean_loss = (sums[0] / sums[3]).item()
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(step + 1, mean_loss)
    return sums


def train(
    cfg: TrainConfig,
    report: Report,
    *,
    resume_from: str | Path | None = None,
    checkpoint_root: str | Path | None = None,
    gflops: float | None = None,
    step_callbacks: Sequence[StepCallback] = (),
    sample_dir: str | Path | None = None,
) -> TrainResult:
    """Train one DiT on this worker. Every rank calls this; rank 0's reports carry the metrics.

    ``report(metrics, checkpoint_dir)``: called by every rank the same number of times, at
    every ``log_every``, checkpoint and evaluation step. ``resume_from``: a checkpoint folder
    to continue from (exactly). ``checkpoint_root``: where to stage checkpoints (a temporary
    folder when None); the directory handed to ``report`` is owned by the caller afterwards.
    ``gflops``: the model's forward Gflops (counted here when None).
    ``step_callbacks``: the loop's extension point. Each is called as ``callback(step, engine)``
    after every completed optimizer step (``step`` counts from 1; the EMA is updated, the
    step's metrics are in the window, nothing is reported or checkpointed yet), on every rank,
    in order. Uses: fault injection in tests (poison the weights, fill the disk, kill a
    rank), custom probes. An exception from one ends the run like any training error.
    ``sample_dir``: where rank 0 saves each evaluation's sample grid (:func:`sample_grid_path`).
    """
    w = _setup(cfg, gflops)
    step, images_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(w.engine, w.ema, Path(resume_from))
        step, images_seen = int(state["step"]), int(state["images_seen"])
    stream = open_stream(cfg, w.micro, w.rank, w.world, start_batch=step * w.accum)
    batches = iter(stream)
    evaluator, eval_model = _build_evaluator(cfg, w.manifest, w.mcfg, w.diffusion, w.device)
    staging = Path(checkpoint_root) if checkpoint_root else None
    window, history, last_ckpt = _Window(), [], None
    w.engine.train()

    while step < cfg.steps:
        t0 = time.perf_counter()
        sums = _optimizer_step(w, batches, step)
        w.ema.update()
        step += 1
        images_seen += cfg.global_batch
        window.add(sums, w.engine.get_global_grad_norm(), time.perf_counter() - t0, cfg.global_batch)
        for callback in step_callbacks:
            callback(step, w.engine)

        checkpoint_now = step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        eval_now = evaluator is not None and cfg.eval.due(step, cfg.steps)
        if step % cfg.log_every == 0 or checkpoint_now or eval_now:
            metrics = window.metrics(step, images_seen, w.gflops, stream, w.device)
            if eval_now:
                copy_ema(eval_model, w.ema)
                grid = sample_grid_path(sample_dir, step) if sample_dir else None
                metrics.update(evaluator.run(eval_model, grid_path=grid))
            history.append(metrics)
            ckpt_dir = _checkpoint(w, staging, step, images_seen) if checkpoint_now else None
            last_ckpt = str(ckpt_dir) if ckpt_dir else last_ckpt
            report(metrics, str(ckpt_dir) if ckpt_dir else None)

    return TrainResult(step, images_seen, history[-1]["train/loss"] if history else float("nan"),
                       last_ckpt, history)


def _checkpoint(w: _Worker, staging: Path | None, step: int, images_seen: int) -> Path:
    """Save the step-``step`` checkpoint (all ranks); its folder."""
    ckpt_dir = staging_dir(staging, step)
    state = {"step": step, "images_seen": images_seen, "seed": w.cfg.seed,
             "stream_batch": step * w.accum, "world_size": w.world,
             "model": w.mcfg.to_dict(), "gflops": w.gflops}
    save_checkpoint(w.engine, w.ema, ckpt_dir, state, w.rank)
    return ckpt_dir


def _build_evaluator(cfg: TrainConfig, manifest, mcfg: DiTConfig, diffusion, device: torch.device):
    """The evaluator (extractor, codec and reference statistics loaded: a bad eval setup fails
    before the first step) and a model to hold EMA copies; (None, None) when eval is off."""
    if not cfg.eval.enabled:
        return None, None
    evaluator = Evaluator(cfg.eval, manifest=manifest, diffusion=diffusion, device=device,
                          random_flip=cfg.random_flip).setup()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        eval_model = create_model(mcfg).to(device).eval().requires_grad_(False)
    return evaluator, eval_model


class _Window:
    """Accumulates per-step values between two reports; averages are over ranks and steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.grad_norms: list[float] = []
        self.seconds = 0.0
        self.images = 0

    def add(self, sums: torch.Tensor, grad_norm: float | None, seconds: float, images: int) -> None:
        self.sums += sums
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            self.grad_norms.append(float(grad_norm))
        self.seconds += seconds
        self.images += images

    def metrics(self, step: int, images_seen: int, gflops: float, stream, device) -> dict[str, float]:
        loss, mse, vb = (self.sums[:3] / max(self.sums[3].item(), 1.0)).tolist()
        images_per_s = self.images / self.seconds if self.seconds else 0.0
        skipped = all_reduce_sum(torch.tensor([float(getattr(stream, "skipped", 0))]))
        out = {
            "step": float(step),
            "train/loss": loss,
            "train/mse": mse,
            "train/vb": vb,
            "train/images_per_s": images_per_s,
            # Gflops count multiply-adds: x FLOPS_PER_MAC for hardware flops; training = 3 passes
            "train/tflops_per_s": training_compute(gflops * FLOPS_PER_MAC, images_per_s) / 1e3,
            "train/compute_gflops": training_compute(gflops, images_seen),
            "train/images_seen": float(images_seen),
            SKIPPED_SAMPLES: skipped.item(),
            BAD_SHARDS: _bad_shard_count(stream),
            "sys/peak_memory_gb": _peak_memory_gb(device),
        }
        if self.grad_norms:
            out["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        self.reset()
        return out


def _bad_shard_count(stream) -> float:
    """Distinct damaged shards seen by any rank: one flag per manifest shard, summed over ranks
    (a sum of per-rank counts would count a shard twice when two ranks read it)."""
    names = [os.path.basename(u) for u in stream.manifest.shard_urls()]  # as the stream names them
    flags = torch.tensor([float(n in stream.bad_shards) for n in names], dtype=torch.float64)
    return float((all_reduce_sum(flags) > 0).sum().item())
