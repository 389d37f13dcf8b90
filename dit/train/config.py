"""One trial's recipe (:class:`TrainConfig`) and what follows from it alone: the model config
for the data (:func:`resolve_model`), the diffusion process (:func:`make_diffusion`), the
micro-batch split (:meth:`TrainConfig.accumulation`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dit.diffusion import create_diffusion
from dit.errors import ConfigError
from dit.evaluate.config import EvalConfig
from dit.models import DiTConfig, model_config, parse_model_name

__all__ = ["TrainConfig", "compute_dtype", "make_diffusion", "resolve_model"]


class TrainConfig(BaseModel):
    """One trial's recipe. Defaults are the paper's (AdamW 1e-4, no decay, batch 256, EMA 0.9999)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # lr: "1e999" is a typo, not inf

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


def make_diffusion(cfg: TrainConfig | None = None, *, learn_sigma: bool | None = None):
    """The training diffusion process of a recipe (the paper's 1000 linear steps without one).

    ``learn_sigma`` overrides the recipe's (a model loaded from weights knows its own)."""
    if cfg is None:
        return create_diffusion(learn_sigma=True if learn_sigma is None else learn_sigma)
    return create_diffusion(steps=cfg.diffusion_steps, schedule=cfg.noise_schedule,
                            learn_sigma=cfg.learn_sigma if learn_sigma is None else learn_sigma)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the latents enter the model in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
