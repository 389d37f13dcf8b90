"""Evaluation settings (:class:`EvalConfig`, ``TrainConfig.eval``) and the run tags that say how
an FID was made (:func:`eval_tags`)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from dit.errors import ConfigError
from dit.evaluate.features import canonical_name, describe_resize

__all__ = ["EvalConfig", "eval_tags"]


class EvalConfig(BaseModel):
    """In-loop evaluation settings (``TrainConfig.eval``; a study's top-level ``eval``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = False
    every: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("every", "interval"),
        description="steps between evaluations (alias: interval); null = only at the end",
    )
    at_end: bool = Field(True, description="evaluate the final EMA weights")
    num_samples: int = Field(50_000, ge=2, description="generated images per FID (the paper: 50K)")
    batch_size: int = Field(
        64, ge=1, description="samples per worker per sampler call; the sample set depends on it, not on the workers"
    )
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int = Field(250, ge=1, description="respaced sampling steps (the paper: 250 DDPM steps)")
    eta: float = Field(0.0, ge=0, description="DDIM noise (0 = deterministic DDIM)")
    clip_denoised: bool | None = Field(
        None,
        description="clip each step's predicted x0 to [-1, 1]; null = when the model works on pixels (an "
        "identity codec, e.g. the digits demo), never on VAE latents, which are unbounded (the DiT paper)",
    )
    cfg_scale: float = Field(1.0, ge=0, description="classifier-free guidance scale; 1 = none (paper headline 1.5)")
    cfg_channels: Literal["all", "first3"] = Field(
        "all", description="'first3' reproduces the reference code's guidance on 3 of 4 latent channels"
    )
    labels: Literal["balanced", "uniform"] = Field(
        "balanced", description="class labels: exactly balanced, or uniform-random as the reference sampler"
    )
    features: str = Field(
        "inception-v3-tf",
        description="feature extractor: inception-v3-tf, digits-cnn-v1 (digits data), or 'module:factory'; "
        "FIDs only compare within one",
    )
    feature_weights: str | None = Field(
        None, description="weights file of the extractor (default: the torch hub cache / the manifest's record)"
    )
    reference: str | None = Field(
        None, description="reference statistics: an ADM-style .npz (mu, sigma) or a manifest; default the training data"
    )
    reference_samples: int | None = Field(
        None, ge=2, description="real samples behind computed reference statistics (default: all)"
    )
    quantize: bool = Field(True, description="round images to 8 bits before the extractor, as PNG files would be")
    precision_recall: bool = Field(False, description="also k-NN precision/recall (ADM evaluator style)")
    pr_k: int = Field(3, ge=1, description="neighbourhood size for precision/recall")
    pr_samples: int = Field(10_000, ge=4, description="images per side for precision/recall (gathered on rank 0)")
    inception_score: bool = Field(False, description="also the Inception Score (extractors with class logits)")
    seed: int = 0

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the loop evaluates after ``step``."""
        if not self.enabled:
            return False
        return bool((self.every and step % self.every == 0) or (self.at_end and step == total_steps))

    def respacing(self, diffusion_steps: int) -> str | int:
        """The sampler's respacing: DDIM's even stride ("ddimN") where one fits, else N sections."""
        if self.sampler == "ddim":
            from dit.diffusion import space_timesteps

            try:
                space_timesteps(diffusion_steps, f"ddim{self.steps}")
                return f"ddim{self.steps}"
            except ConfigError:
                pass
        return self.steps


def eval_tags(cfg: EvalConfig, image_size: int | None = None) -> dict[str, str]:
    """Run tags that say how an FID was made (FIDs from different setups do not compare)."""
    if not cfg.enabled:
        return {}
    return {
        "eval.features": canonical_name(cfg.features),
        "eval.num_samples": str(cfg.num_samples),
        "eval.sampler": cfg.sampler,
        "eval.steps": str(cfg.steps),
        "eval.cfg_scale": f"{cfg.cfg_scale:g}",
        "eval.cfg_channels": cfg.cfg_channels,
        "eval.clip_denoised": "auto" if cfg.clip_denoised is None else str(cfg.clip_denoised).lower(),
        "eval.labels": cfg.labels,
        "eval.resize": describe_resize(cfg.features, image_size),
        "eval.quantize": str(cfg.quantize).lower(),
        "eval.reference": cfg.reference or "training data",
        "eval.seed": str(cfg.seed),
    }
