"""The process group and the DeepSpeed engine of one worker."""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any

import torch
import torch.distributed as dist

from dit.models import DiT
from dit.train.config import TrainConfig

__all__ = ["build_engine", "deepspeed_config", "init_distributed"]

# DeepSpeed's ZeRO code calls torch.distributed APIs that torch now marks deprecated.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


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
