"""Seeded, worker-count-independent sampling: labels, chunks, guidance, and images -> features.

``num_samples`` images are cut into fixed chunks of ``batch_size``; chunk ``c`` goes to rank
``c % world_size`` and is drawn from its own generator seeded by ``(seed, c)`` (x_T and every
step's noise), with its slice of one global label list. So the same EMA weights give the same
images whatever the worker count (for a fixed ``batch_size``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator

import torch

from dit.errors import ConfigError
from dit.evaluate.config import EvalConfig
from dit.evaluate.features import FeatureExtractor

__all__ = [
    "class_labels",
    "clips_denoised",
    "features_of",
    "generate",
    "quantize_images",
    "rank_chunks",
]


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers."""
    h = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def class_labels(num_samples: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """The global label list: ``balanced`` has every class ``num_samples // num_classes`` or one
    more times (exactly equal when it divides), in a seeded order; ``uniform`` draws i.i.d."""
    if num_classes < 1:
        raise ConfigError("evaluation needs a class-conditional model (num_classes >= 1)")
    g = torch.Generator().manual_seed(_mix(seed, 0x1ABE15))
    if mode == "balanced":
        return (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=g)]
    if mode == "uniform":
        return torch.randint(0, num_classes, (num_samples,), generator=g)
    raise ConfigError(f"eval.labels must be 'balanced' or 'uniform'; got {mode!r}")


def rank_chunks(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """(chunk, first, end) sample ranges this rank generates: chunks rank, rank + W, ..."""
    n_chunks = math.ceil(num_samples / batch_size)
    return [(c, c * batch_size, min((c + 1) * batch_size, num_samples)) for c in range(rank, n_chunks, world_size)]


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the nearest of 256 levels (what saving and reloading a PNG does)."""
    return ((images + 1.0) * 127.5).round_().clamp_(0, 255) / 127.5 - 1.0


@torch.no_grad()
def features_of(images: torch.Tensor, extractor: FeatureExtractor, quantize: bool, logits: bool = False):
    """(features, logits or None) of images in [-1, 1], quantized to 8 bits first when asked."""
    if quantize:
        images = quantize_images(images.float())
    return extractor.features_and_logits(images, logits=logits)


class _Guided:
    """A model whose ``forward_with_cfg`` guides only ``guide_channels`` channels (the reference quirk)."""

    def __init__(self, model: Any, guide_channels: int) -> None:
        self.model, self.guide_channels = model, guide_channels
        self.num_classes = getattr(model, "num_classes", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y)

    def parameters(self):
        return self.model.parameters()

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        return self.model.forward_with_cfg(x, t, y, cfg_scale, guide_channels=self.guide_channels)


def _sampling_model(model: Any, cfg: EvalConfig) -> Any:
    if cfg.cfg_scale != 1.0:
        emb = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
        classes = getattr(model, "num_classes", None)
        if emb is not None and classes is not None and emb.num_embeddings <= classes:
            raise ConfigError(
                f"eval.cfg_scale {cfg.cfg_scale}: guidance needs the null class, and this model was trained "
                "with class_dropout_prob 0; use cfg_scale 1"
            )
        if cfg.cfg_channels == "first3":
            return _Guided(model, 3)
    return model


def clips_denoised(cfg: EvalConfig, codec: Any) -> bool:
    """Whether sampling clips x0: as configured, else only where the model-space values are pixels
    in [-1, 1]. There a wild early x0 estimate (an undertrained model) is pulled back into the
    data range instead of saturating the sample; VAE latents have no such range to clip to."""
    if cfg.clip_denoised is not None:
        return cfg.clip_denoised
    return bool(getattr(codec, "bounded", False))


@torch.no_grad()
def generate(
    model: Any,
    diffusion: Any,
    cfg: EvalConfig,
    *,
    latent_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str = "cpu",
    codec: Any = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """This rank's share of the samples: ``(first, end, images, labels)`` per chunk.

    ``images`` are decoded through ``codec`` (in [-1, 1]); with ``codec=None`` the raw
    model-space latents. ``diffusion`` is the training process (respaced here).
    """
    device = torch.device(device)
    labels = class_labels(cfg.num_samples, num_classes, cfg.labels, cfg.seed)
    clip = clips_denoised(cfg, codec)
    net = _sampling_model(model, cfg)
    spacing = cfg.respacing(len(diffusion.base_betas))
    for c, lo, hi in rank_chunks(cfg.num_samples, cfg.batch_size, rank, world_size):
        g = torch.Generator(device=device).manual_seed(_mix(cfg.seed, c))
        y = labels[lo:hi].to(device)
        z = diffusion.sample(net, (hi - lo, *latent_shape), y, sampler=cfg.sampler, steps=spacing,
                             cfg_scale=cfg.cfg_scale, eta=cfg.eta, generator=g, clip_denoised=clip)
        yield lo, hi, (codec.decode(z, scaled=True) if codec is not None else z), y
