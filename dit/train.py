"""The per-worker training loop: one DiT, one DeepSpeed engine, one latent stream.

Knows nothing of Ray or MLflow. The caller passes a ``report(metrics, checkpoint_dir)``
callback that every rank calls the same number of times (Ray Train's report is a barrier),
and optionally a checkpoint directory to resume from.

Exact resume: every random draw of step ``s`` on rank ``r`` comes from generators seeded with
(seed, rank, s), and the data stream is restarted at the micro-batch it had reached, so a
run resumed from step ``s`` repeats the uninterrupted run's steps after ``s`` bit for bit
(on the same hardware and worker count).

Evaluation (``cfg.eval``, see ``dit.evaluate``): every ``eval.every`` steps and at the end,
all ranks sample with a copy of the EMA weights, compute features and all-reduce their
sums; rank 0's FID (``eval/fid``, ...) joins that step's training metrics in the same
``report`` call. Evaluation is seeded and never touches the training RNG or data stream, so
exact resume holds with it on. With ``sample_dir``, rank 0 also saves a PNG grid of samples
per evaluation there (``samples_step<NNNNNNNN>.png``, written before that step's report).
"""

from __future__ import annotations

import json
import math
import warnings
import os
import resource
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dit.diffusion import create_diffusion
from dit.errors import ConfigError
from dit.evaluate import EvalConfig
from dit.models import DiT, DiTConfig, create_model, model_config, parse_model_name

# DeepSpeed's ZeRO code calls torch.distributed APIs that torch now marks deprecated.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

Report = Callable[[dict[str, float], "str | None"], None]

CHECKPOINT_STATE = "trainer_state.json"
EMA_FILE = "ema.pt"
DS_TAG = "deepspeed"


class TrainConfig(BaseModel):
    """One trial's recipe. Defaults are the paper's (AdamW 1e-4, no decay, batch 256, EMA 0.9999)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | dict[str, Any] = Field("DiT-S/2", description="a name like DiT-XL/2 or a custom config")
    block: str | None = Field(None, description="conditioning design override (adaln-zero, adaln, ...)")
    data: str = Field(..., description="latent manifest (path or fsspec URL)")
    steps: int = Field(..., ge=1)
    global_batch: int = Field(256, ge=1, description="images per optimizer step, all workers together")
    micro_batch: int | None = Field(
        None, ge=1, description="images per worker per forward; default global_batch / workers"
    )
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(0.0, ge=0, description="max grad norm; 0 = off (the paper)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = Field(2, ge=0, le=3)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    diffusion_steps: int = Field(1000, ge=1)
    noise_schedule: Literal["linear", "cosine"] = "linear"
    learn_sigma: bool = True
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)
    grad_checkpointing: bool = False
    random_flip: bool = True
    shuffle_buffer: int = Field(1000, ge=0)
    loader_workers: int = Field(0, ge=0)
    strict_data: bool = Field(False, description="fail on a corrupt shard instead of skipping it")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="in-loop evaluation (FID); off by default")

    @model_validator(mode="after")
    def _check_eval(self) -> "TrainConfig":
        if self.eval.enabled and self.eval.steps > self.diffusion_steps:
            raise ValueError(
                f"eval.steps ({self.eval.steps}) cannot exceed diffusion_steps ({self.diffusion_steps})"
            )
        return self

    @model_validator(mode="after")
    def _check_model(self) -> "TrainConfig":
        # The latent size comes from the data later; here check the model on its own (an
        # input of one patch), so any patch that divides the real latent is accepted.
        patch = parse_model_name(self.model)[1] if isinstance(self.model, str) else self.model.get("patch_size")
        overrides: dict[str, Any] = {"block": self.block} if self.block else {}
        if isinstance(patch, int) and patch > 0:
            overrides["input_size"] = patch
        model_config(self.model, **overrides)
        return self

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, gradient accumulation steps) for a worker count; ConfigError if impossible."""
        micro = self.micro_batch or self.global_batch // max(world_size, 1)
        if micro < 1 or self.global_batch % (micro * world_size):
            raise ConfigError(
                f"global_batch ({self.global_batch}) must be divisible by workers ({world_size}) x "
                f"micro_batch ({micro}); change global_batch, micro_batch or the worker count"
            )
        return micro, self.global_batch // (micro * world_size)


@dataclass
class TrainResult:
    step: int
    images_seen: int
    final_loss: float
    checkpoint_dir: str | None
    metrics: list[dict[str, float]] = field(default_factory=list)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable storage); earlier ones are intact."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the trial stops at once with the step and the value."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step}; stopping the trial")
        self.step, self.value = step, value


# --------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Reuse the process group Ray Train / torchrun made, or make a one-process gloo group."""
    import deepspeed

    # The shared-memory all-reduce op is only for inference and JIT-compiles for ~60 s on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def deepspeed_config(cfg: TrainConfig, micro: int, accum: int) -> dict[str, Any]:
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
        # memory_efficient_linear would replace torch.nn.functional.linear process-wide (for
        # every later model, and fvcore's Gflops count) with ZeRO-3's own autograd function.
        "zero_optimization": {"stage": cfg.zero_stage, "memory_efficient_linear": False},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: TrainConfig, model: DiT, micro: int, accum: int):
    import deepspeed

    # A client optimizer avoids compiling DeepSpeed's fused/CPU Adam kernels.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = cfg.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, micro, accum),
        dist_init_required=False,
    )
    return engine


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the weights, kept in fp32 on every rank.

    Every rank holds the full EMA so evaluation can sample on all ranks. Under ZeRO-3 the
    live parameters are partitioned, so each update gathers them first.
    """

    def __init__(self, engine, decay: float):
        self.engine, self.decay = engine, decay
        with self._gathered():
            self.names = [n for n, _ in self._params()]
            self.shadow = [p.detach().float().clone() for _, p in self._params()]

    def _params(self):
        return ((n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad)

    def _gathered(self):
        import deepspeed

        params = [p for _, p in self._params()]
        return deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3)

    @torch.no_grad()
    def update(self) -> None:
        with self._gathered():
            live = [p.detach().float() for _, p in self._params()]
            torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights plus the model's buffers: the official DiT layout."""
        sd = {n: t.detach().cpu().clone() for n, t in zip(self.names, self.shadow)}
        for name, buf in self.engine.module.named_buffers():
            sd[name] = buf.detach().cpu().clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(sd[name])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(engine, ema: EMA, directory: Path, state: dict[str, Any], rank: int) -> None:
    """Every rank writes its DeepSpeed shard; rank 0 adds the EMA and the trainer state.

    Files are written under a temporary name and the directory is complete only once
    ``trainer_state.json`` exists (written last), so a half-written checkpoint is never read.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"ditscale_step": state["step"]})
        if rank == 0:
            tmp = directory / (EMA_FILE + ".tmp")
            torch.save(ema.state_dict(), tmp)
            tmp.replace(directory / EMA_FILE)
            tmp = directory / (CHECKPOINT_STATE + ".tmp")
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(directory / CHECKPOINT_STATE)
    except (OSError, RuntimeError) as err:  # disk full, unwritable, quota: torch wraps some as RuntimeError
        shutil.rmtree(directory, ignore_errors=True)  # never leave a half checkpoint behind
        raise CheckpointWriteError(
            f"cannot write the step-{state['step']} checkpoint to {directory}: {err}. Earlier "
            "checkpoints are untouched; free space or fix the storage path, then resume"
        ) from err
    dist.barrier()


def _deepspeed_safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoint shards pickle, besides tensors and plain types."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_checkpoint_files(directory: Path) -> None:
    """Refuse a checkpoint whose pickles hold anything but tensors, plain data and the allowlist.

    DeepSpeed's own loader calls ``torch.load(weights_only=False)``; reading every file once
    with ``weights_only=True`` first means a tampered shard is rejected before it can run code.
    """
    allowed = _deepspeed_safe_globals()
    for path in sorted(directory.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(
                f"checkpoint file {str(path)!r} is not loadable with weights_only=True "
                f"({str(err).splitlines()[-1][:300]}); refusing to resume from it"
            ) from None


def load_checkpoint(engine, ema: EMA, directory: Path) -> dict[str, Any]:
    state_file = directory / CHECKPOINT_STATE
    if not state_file.is_file():
        raise ConfigError(f"checkpoint {str(directory)!r} is incomplete: no {CHECKPOINT_STATE}")
    verify_checkpoint_files(directory)
    load_path, _ = engine.load_checkpoint(str(directory), tag=DS_TAG)
    if load_path is None:
        raise ConfigError(f"checkpoint {str(directory)!r} has no DeepSpeed state under {DS_TAG}/")
    ema.load_state_dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True))
    return json.loads(state_file.read_text())


def export_checkpoint(directory: str | Path, out: str | Path) -> Path:
    """A training checkpoint -> a plain state dict of the EMA weights (official DiT layout)."""
    src = Path(directory) / EMA_FILE
    if not src.is_file():
        raise ConfigError(f"{str(directory)!r} is not a ditscale checkpoint (no {EMA_FILE})")
    sd = torch.load(src, map_location="cpu", weights_only=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + step) % (2**63))
    return g


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def resolve_model(cfg: TrainConfig, manifest) -> DiTConfig:
    """The model config with the data's latent shape and class count filled in."""
    channels, height, width = manifest.latent_shape
    if height != width:
        raise ConfigError(f"data {cfg.data!r}: latents must be square, got {height}x{width}")
    overrides = dict(
        input_size=height,
        in_channels=channels,
        num_classes=manifest.num_classes,
        learn_sigma=cfg.learn_sigma,
        class_dropout_prob=cfg.class_dropout_prob,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.block:
        overrides["block"] = cfg.block
    return model_config(cfg.model, **overrides)


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


def train(
    cfg: TrainConfig,
    report: Report,
    *,
    resume_from: str | Path | None = None,
    checkpoint_root: str | Path | None = None,
    gflops: float | None = None,
    fault: Callable[[int, Any], None] | None = None,
    sample_dir: str | Path | None = None,
) -> TrainResult:
    """Train one DiT on this worker. Every rank calls this; rank 0's reports carry the metrics.

    ``checkpoint_root``: where to stage checkpoints (a temporary folder when None); the
    directory handed to ``report`` is owned by the caller afterwards.
    ``fault``: a test hook called with each completed step and the engine (fault injection).
    ``sample_dir``: where rank 0 saves each evaluation's sample grid (:func:`sample_grid_path`).
    """
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
    diffusion = create_diffusion(
        steps=cfg.diffusion_steps, schedule=cfg.noise_schedule, learn_sigma=cfg.learn_sigma
    )

    step, images_seen, compute_dtype = 0, 0, _compute_dtype(cfg.precision)
    if resume_from is not None:
        state = load_checkpoint(engine, ema, Path(resume_from))
        step, images_seen = int(state["step"]), int(state["images_seen"])

    stream = open_stream(cfg, micro, rank, world, start_batch=step * accum)
    batches = iter(stream)
    evaluator, eval_model = _build_evaluator(cfg, manifest, mcfg, diffusion, device)
    staging = Path(checkpoint_root) if checkpoint_root else None
    window = _Window()
    history: list[dict[str, float]] = []
    last_ckpt: str | None = None
    engine.train()

    while step < cfg.steps:
        t0 = time.perf_counter()
        gen = _step_generator(cfg.seed, rank, step, device)
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # label dropout
        sums = torch.zeros(4, dtype=torch.float64)
        for _ in range(accum):
            x, y = next(batches)
            x, y = x.to(device, compute_dtype), y.to(device)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device, generator=gen)
            noise = torch.randn(x.shape, device=device, dtype=x.dtype, generator=gen)
            losses = diffusion.training_losses(engine, x, t, y, noise=noise)
            loss = losses["loss"].mean()
            engine.backward(loss)
            engine.step()
            sums += torch.tensor(
                [loss.item(), losses["mse"].mean().item(), losses["vb"].mean().item(), 1.0],
                dtype=torch.float64,
            )
        dist.all_reduce(sums)  # every rank sees the global mean, so all stop together on NaN
        mean_loss = (sums[0] / sums[3]).item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(step + 1, mean_loss)
        ema.update()
        step += 1
        images_seen += cfg.global_batch
        window.add(sums, engine.get_global_grad_norm(), time.perf_counter() - t0, cfg.global_batch)
        if fault is not None:
            fault(step, engine)

        checkpoint_now = step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        eval_now = evaluator is not None and cfg.eval.due(step, cfg.steps)
        if step % cfg.log_every == 0 or checkpoint_now or eval_now:
            metrics = window.metrics(step, images_seen, gflops, stream, device)
            if eval_now:
                copy_ema(eval_model, ema)
                grid = sample_grid_path(sample_dir, step) if sample_dir else None
                metrics.update(evaluator.run(eval_model, grid_path=grid))
            history.append(metrics)
            ckpt_dir = None
            if checkpoint_now:
                ckpt_dir = _checkpoint_dir(staging, step)
                state = {"step": step, "images_seen": images_seen, "seed": cfg.seed,
                         "stream_batch": step * accum, "world_size": world,
                         "model": mcfg.to_dict(), "gflops": gflops}
                save_checkpoint(engine, ema, ckpt_dir, state, rank)
                last_ckpt = str(ckpt_dir)
            report(metrics, str(ckpt_dir) if ckpt_dir else None)

    return TrainResult(step, images_seen, history[-1]["train/loss"] if history else float("nan"),
                       last_ckpt, history)


def sample_grid_path(sample_dir: str | Path, step: int) -> Path:
    """The sample grid of the evaluation after ``step``."""
    return Path(sample_dir) / f"samples_step{step:08d}.png"


def _build_evaluator(cfg: TrainConfig, manifest, mcfg: DiTConfig, diffusion, device: torch.device):
    """The evaluator (extractor, codec and reference statistics loaded: a bad eval setup fails
    before the first step) and a model to hold EMA copies; (None, None) when eval is off."""
    if not cfg.eval.enabled:
        return None, None
    from dit.evaluate import Evaluator

    evaluator = Evaluator(cfg.eval, manifest=manifest, diffusion=diffusion, device=device,
                          random_flip=cfg.random_flip).setup()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        eval_model = create_model(mcfg).to(device).eval().requires_grad_(False)
    return evaluator, eval_model


@torch.no_grad()
def copy_ema(model: torch.nn.Module, ema: EMA) -> torch.nn.Module:
    """Load the EMA weights into ``model`` (same architecture), device to device."""
    params = dict(model.named_parameters())
    for name, shadow in zip(ema.names, ema.shadow):
        params[name].copy_(shadow)
    return model


def _compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _checkpoint_dir(staging: Path | None, step: int) -> Path:
    import tempfile

    root = staging or Path(tempfile.mkdtemp(prefix="ditscale-ckpt-"))
    path = root / f"checkpoint_{step:08d}"
    if path.exists():  # a leftover from a crashed attempt at the same step
        shutil.rmtree(path)
    return path


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
        skipped = torch.tensor([float(getattr(stream, "skipped", 0))])
        dist.all_reduce(skipped)
        out = {
            "step": float(step),
            "train/loss": loss,
            "train/mse": mse,
            "train/vb": vb,
            "train/images_per_s": images_per_s,
            # fvcore counts multiply-adds; x2 for flops, x3 for forward + backward
            "train/tflops_per_s": gflops * 2 * 3 * images_per_s / 1e3,
            "train/compute_gflops": gflops * 3 * images_seen,
            "train/images_seen": float(images_seen),
            "data/skipped_samples": skipped.item(),
            "sys/peak_memory_gb": _peak_memory_gb(device),
        }
        if self.grad_norms:
            out["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        self.reset()
        return out
