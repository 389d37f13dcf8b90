"""Evaluation on every worker of a trial: sample with the EMA weights -> decode -> features -> FID.

Sampling. ``num_samples`` images are cut into fixed chunks of ``batch_size``; chunk ``c``
goes to rank ``c % world_size`` and is drawn from its own generator seeded by ``(seed, c)``
(x_T and every step's noise), with its slice of one global label list. So the same EMA
weights give the same images whatever the worker count (for a fixed ``batch_size``).
Labels are exactly balanced by default (each class ``num_samples / num_classes`` times,
in a seeded order) or uniform-random like the reference ``sample_ddp.py`` (``labels:
uniform``). The sampler is respaced DDPM (250 steps, the paper) or DDIM (``eta``);
classifier-free guidance with ``cfg_scale`` (1 = none, the paper's headline 1.5) on all
latent channels, or on the first three as the reference code did (``cfg_channels:
first3``). Latents are decoded with the codec the manifest names (``decode(z, scaled=True)``:
the model space is the stored latents x the manifest's scale factor).

Features and FID. Images are quantized to 8 bits (as saving PNGs would; ``quantize``) and
handed to a :mod:`dit.features` extractor. Each rank keeps only mergeable sums
(:class:`dit.fid.FeatureStats`), all-reduced once; rank 0 computes the Fréchet distance
against the reference statistics, which come from an ADM-style ``.npz`` (``mu``, ``sigma``)
or are computed once from the real latents behind a manifest (decoded the same way, split
across the ranks, cached next to the manifest as ``features/reference-<extractor>-<key>.npz``).
Optional: Inception Score (extractors with logits; mergeable sums too) and k-NN
precision/recall (features of up to ``pr_samples`` images gathered to rank 0).

Sample grids. ``Evaluator.run(model, grid_path=...)`` also writes a PNG of rank 0's first
samples (class-balanced: one row per class when there are at most 16 classes, else the first
64 distinct classes), upscaled with nearest-neighbour so each cell is at least 64 px.

Evaluation never draws from the global RNG (it runs under ``fork_rng`` and seeded
generators), so training after an evaluation is bit-identical to training without one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from dit.errors import ConfigError
from dit.features import FeatureExtractor, canonical_name, describe_resize, load_extractor
from dit.fid import ClassStats, FeatureStats, frechet_distance, load_statistics, precision_recall, save_statistics

__all__ = [
    "EvalConfig",
    "Evaluator",
    "Reference",
    "class_labels",
    "eval_tags",
    "evaluate",
    "clips_denoised",
    "generate",
    "quantize_images",
    "load_checkpoint_model",
    "rank_chunks",
    "reference_statistics",
    "sample_grid",
    "save_sample_grid",
]

REFERENCE_VERSION = 1


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


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Collectives (no-ops in one process)
# --------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, on rank 0 (None elsewhere)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _on_rank0(fn: Any) -> tuple[Any, bool]:
    """Run ``fn`` on rank 0 only: (its result there / None elsewhere, whether it was not None).
    A ConfigError it raises is raised on every rank, so all ranks fail alike."""
    result, error = None, None
    if _world()[0] == 0:
        try:
            result = fn()
        except ConfigError as err:
            error = str(err)
    error, found = _broadcast((error, result is not None))
    if error is not None:
        raise ConfigError(error)
    return result, found


# --------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    source: str
    features: np.ndarray | None = None  # up to pr_samples real features (precision/recall)


def _is_npz(ref: str) -> bool:
    return ref.lower().endswith(".npz")


def _cache_dir(manifest: Any) -> Path:
    url = manifest.url or ""
    if url and "://" not in url.replace("file://", "", 1):
        return Path(url.removeprefix("file://")).parent / "features"
    root = os.environ.get("DITSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ditscale")
    return Path(root) / "reference"


def _reference_path(manifest: Any, cfg: EvalConfig, extractor: FeatureExtractor, flip: bool) -> Path:
    key = {
        "version": REFERENCE_VERSION, "data": manifest.config_hash or manifest.url, "num_samples": manifest.num_samples,
        "extractor": extractor.name, "weights": extractor.fingerprint, "flip": flip, "n": cfg.reference_samples,
        "quantize": cfg.quantize, "pr": cfg.pr_samples if cfg.precision_recall else 0,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return _cache_dir(manifest) / f"reference-{re.sub(r'[^A-Za-z0-9_.-]', '_', extractor.name)}-{digest}.npz"


@torch.no_grad()
def _features_of(images: torch.Tensor, extractor: FeatureExtractor, quantize: bool, logits: bool = False):
    if quantize:
        images = quantize_images(images.float())
    return extractor.features_and_logits(images, logits=logits)


def _manifest_statistics(manifest: Any, cfg: EvalConfig, extractor: FeatureExtractor, codec: Any,
                         device: torch.device, flip: bool, keep: int) -> tuple[FeatureStats, np.ndarray | None]:
    """Statistics of the real latents of a manifest (each sample once, in the seeded stream order),
    this rank's share of the batches, all-reduced; the first ``keep`` features gathered on rank 0."""
    from dit.latents import LatentStream

    rank, world = _world()
    total = min(manifest.num_samples, cfg.reference_samples or manifest.num_samples)
    B = cfg.batch_size
    stream = LatentStream(manifest, B, rank=0, world_size=1, seed=0, shuffle_buffer=0, random_flip=flip,
                          epoch_length=math.ceil(total / B))
    stats, kept = FeatureStats(extractor.dim, device), []
    for i, (lat, _) in enumerate(stream):
        lo = i * B
        if i % world != rank or lo >= total:
            continue
        images = codec.decode(lat[: total - lo].to(device), scaled=True)
        feats, _ = _features_of(images, extractor, cfg.quantize)
        stats.update(feats)
        if lo < keep:
            kept.append((lo, feats[: keep - lo].float().cpu()))
    stats.all_reduce()
    gathered = _gather(kept) if keep else None
    feats = None
    if gathered is not None and keep:
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
        feats = torch.cat([p[1] for p in parts]).numpy() if parts else None
    return stats, feats


def reference_statistics(
    cfg: EvalConfig,
    *,
    manifest: Any,
    extractor: FeatureExtractor,
    codec: Any = None,
    device: torch.device | str = "cpu",
    random_flip: bool = False,
) -> Reference | None:
    """The reference for ``cfg`` (collective: call on every rank). Rank 0 gets it, others None.

    ``cfg.reference``: an ADM-style ``.npz`` (``mu``/``sigma``; for precision/recall also
    ``features`` or its image batch ``arr_0``), a manifest, or None for ``manifest`` (the
    training data). Manifests are read once, each sample once (a random horizontal view per
    sample when the training flips), decoded, and cached by extractor and settings.
    """
    device = torch.device(device)
    rank, _ = _world()
    ref = cfg.reference
    if ref and _is_npz(ref):
        def load() -> Reference:
            data = load_statistics(ref, images=cfg.precision_recall)
            mu, sigma = data["mu"], data["sigma"]
            if mu.shape != (extractor.dim,) or sigma.shape != (extractor.dim,) * 2:
                raise ConfigError(
                    f"eval.reference {ref!r}: {mu.shape[0] if mu.ndim else 0}-d statistics, but the extractor "
                    f"{extractor.name!r} gives {extractor.dim}-d features"
                )
            name = str(data["extractor"]) if "extractor" in data else None
            if name is not None and name != extractor.name:
                raise ConfigError(f"eval.reference {ref!r} was made with {name!r}, not {extractor.name!r}")
            feats = None
            if cfg.precision_recall:
                if "features" in data:
                    feats = data["features"][: cfg.pr_samples]
                elif "images" in data:  # ADM reference batch: uint8 NHWC
                    imgs = data["images"][: cfg.pr_samples]
                    parts = []
                    for lo in range(0, len(imgs), cfg.batch_size):
                        x = torch.from_numpy(np.ascontiguousarray(imgs[lo : lo + cfg.batch_size]))
                        x = x.permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
                        parts.append(_features_of(x, extractor, False)[0].float().cpu())
                    feats = torch.cat(parts).numpy()
                else:
                    raise ConfigError(f"eval.reference {ref!r}: precision/recall needs 'features' or the images 'arr_0'")
            count = int(data["count"]) if "count" in data else 0
            return Reference(mu, sigma, count, str(ref), feats)

        return _on_rank0(load)[0]

    from dit.latents import Manifest

    m = Manifest.load(ref) if ref else manifest
    if codec is None or ref:
        codec = m.load_codec(device=device)
    flip = bool(random_flip and m.flip)
    path = _reference_path(m, cfg, extractor, flip)

    def cached() -> Reference | None:
        if not path.is_file():
            return None
        try:
            data = load_statistics(path)
        except ConfigError:
            return None  # damaged: compute again
        feats = data.get("features") if cfg.precision_recall else None
        return Reference(data["mu"], data["sigma"], int(data.get("count", 0)), str(path), feats)

    hit, found = _on_rank0(cached)
    if found:
        return hit
    keep = min(cfg.pr_samples, m.num_samples) if cfg.precision_recall else 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        stats, feats = _manifest_statistics(m, cfg, extractor, codec, device, flip, keep)
    if rank != 0:
        return None
    out = Reference(stats.mean(), stats.cov(), stats.count, str(path), feats)
    try:
        save_statistics(path, out.mu, out.sigma, count=np.int64(out.count), extractor=np.str_(extractor.name),
                        features=feats, source=np.str_(m.url or ""))
    except OSError as err:  # a read-only data folder: keep going without the cache
        warnings.warn(f"could not cache reference statistics at {path}: {err}", RuntimeWarning)
    return out


# --------------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------------

GRID_IMAGES = 64
GRID_MIN_CELL_PX = 64


def grid_layout(num_classes: int, max_images: int = GRID_IMAGES) -> tuple[int, int]:
    """(rows, per-class quota): a row per class for up to 16 classes, else one sample of each
    of the first ``max_images`` classes met, 8 to a row."""
    if 1 <= num_classes <= 16:
        return num_classes, max(1, min(8, max_images // num_classes))
    return math.ceil(max_images / 8), 1


class _GridPool:
    """Keeps, from images in sample order, what the grid needs (at most ``max_images``)."""

    def __init__(self, num_classes: int, max_images: int = GRID_IMAGES) -> None:
        self.num_classes, self.max_images = num_classes, max_images
        self.rows, self.quota = grid_layout(num_classes, max_images)
        self.picked: dict[int, list[torch.Tensor]] = {}
        self.order: list[int] = []  # classes in the order first met (many-class layout)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= (self.rows * self.quota if self.num_classes <= 16 else self.max_images)

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        for img, y in zip(images, labels.tolist()):
            if self.full:
                return
            have = self.picked.setdefault(int(y), [])
            if len(have) >= self.quota:
                continue
            if not have:
                self.order.append(int(y))
            have.append(img.detach().float().cpu())
            self.count += 1

    def cells(self) -> list[list[torch.Tensor | None]]:
        if self.num_classes <= 16:
            return [(self.picked.get(c, []) + [None] * self.quota)[: self.quota] for c in range(self.num_classes)]
        flat = [self.picked[c][0] for c in self.order]
        return [flat[i : i + 8] + [None] * (8 - len(flat[i : i + 8])) for i in range(0, len(flat), 8)]


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8; other channel counts show channel means."""
    x = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[0] == 3:
        return x.permute(1, 2, 0).numpy()
    if x.shape[0] == 1:
        return x[0].numpy()
    return x[:3].permute(1, 2, 0).numpy() if x.shape[0] > 3 else x.float().mean(0).round().to(torch.uint8).numpy()


def sample_grid(rows: list[list[torch.Tensor | None]], min_cell_px: int = GRID_MIN_CELL_PX, pad: int = 2) -> np.ndarray:
    """A (H, W, 3) uint8 mosaic of images in [-1, 1]; empty cells stay dark grey."""
    first = next((c for r in rows for c in r if c is not None), None)
    if first is None:
        raise ValueError("a sample grid needs at least one image")
    h, w = first.shape[-2:]
    scale = max(1, math.ceil(min_cell_px / max(min(h, w), 1)))
    ch, cw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (ch + pad) + pad, ncols * (cw + pad) + pad, 3), 32, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img is None:
                continue
            a = _to_uint8(img)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            a = a.repeat(scale, 0).repeat(scale, 1)
            y0, x0 = pad + i * (ch + pad), pad + j * (cw + pad)
            out[y0 : y0 + ch, x0 : x0 + cw] = a
    return out


def save_sample_grid(rows: list[list[torch.Tensor | None]], path: str | Path, **kw: Any) -> Path:
    """Write :func:`sample_grid` as a PNG (atomically: a reader never sees half a file)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(sample_grid(rows, **kw)).save(tmp, format="PNG")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


class Evaluator:
    """FID (and friends) of a model, computed by every rank together. ``setup()`` loads the
    extractor, the codec and the reference; ``run(model)`` returns rank 0's metrics on every rank.

    ``extractor``/``reference`` may be given directly (tests, custom pipelines).
    """

    def __init__(
        self,
        cfg: EvalConfig,
        *,
        manifest: Any,
        diffusion: Any,
        device: torch.device | str = "cpu",
        random_flip: bool = False,
        extractor: FeatureExtractor | None = None,
        reference: Reference | None = None,
        codec: Any = None,
    ) -> None:
        self.cfg, self.manifest, self.diffusion = cfg, manifest, diffusion
        self.device = torch.device(device)
        self.random_flip = random_flip
        self.extractor, self.reference, self.codec = extractor, reference, codec
        self.rank, self.world = _world()
        self._ready = False

    def setup(self) -> "Evaluator":
        if self._ready:
            return self
        cfg = self.cfg
        fork = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            if self.extractor is None:
                self.extractor = load_extractor(cfg.features, manifest=self.manifest, weights=cfg.feature_weights,
                                                device=self.device)
            else:
                self.extractor.to(self.device)
            if self.codec is None:
                self.codec = self.manifest.load_codec(device=self.device)
            if self.reference is None:
                self.reference = reference_statistics(cfg, manifest=self.manifest, extractor=self.extractor,
                                                      codec=self.codec, device=self.device, random_flip=self.random_flip)
        if cfg.inception_score and not self.extractor.num_classes:
            warnings.warn(f"eval.inception_score: extractor {self.extractor.name!r} has no class logits; skipped")
        self._ready = True
        return self

    @torch.no_grad()
    def run(self, model: Any, *, grid_path: str | Path | None = None) -> dict[str, float]:
        """Sample with ``model`` (eval mode, e.g. the EMA weights) and score; collective.

        ``grid_path``: rank 0 also saves a PNG grid of its first samples there (other ranks
        ignore it). A grid that cannot be written is a warning, never a failed evaluation."""
        self.setup()
        cfg, ext = self.cfg, self.extractor
        assert ext is not None
        t0 = time.perf_counter()
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        want_is = cfg.inception_score and ext.num_classes > 0
        stats = FeatureStats(ext.dim, self.device)
        classes = ClassStats(ext.num_classes, self.device) if want_is else None
        kept: list[tuple[int, torch.Tensor]] = []
        m = self.manifest
        pool = _GridPool(m.num_classes) if grid_path is not None and self.rank == 0 else None
        fork = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            for lo, _hi, images, y in generate(
                model, self.diffusion, cfg, latent_shape=tuple(m.latent_shape), num_classes=m.num_classes,
                device=self.device, codec=self.codec, rank=self.rank, world_size=self.world,
            ):
                if pool is not None and not pool.full:
                    pool.add(quantize_images(images.float()) if cfg.quantize else images, y)
                feats, logits = _features_of(images, ext, cfg.quantize, logits=want_is)
                stats.update(feats)
                if classes is not None and logits is not None:
                    classes.update(logits)
                if cfg.precision_recall and lo < cfg.pr_samples:
                    kept.append((lo, feats[: cfg.pr_samples - lo].float().cpu()))
        if was_training and hasattr(model, "train"):
            model.train()
        stats.all_reduce()
        if classes is not None:
            classes.all_reduce()
        gathered = _gather(kept) if cfg.precision_recall else None
        metrics: dict[str, float] | None = None
        if self.rank == 0:
            ref = self.reference
            assert ref is not None
            fd = frechet_distance(stats.mean(), stats.cov(), ref.mu, ref.sigma)
            metrics = {"eval/fid": fd.fid, "eval/fid_sqrtm_imag": fd.imag}
            if classes is not None:
                metrics["eval/inception_score"] = classes.inception_score()
            if gathered is not None:
                parts = sorted((p for r in gathered for p in r), key=lambda p: p[0])
                fake = torch.cat([p[1] for p in parts])
                if ref.features is None:
                    raise ConfigError("precision/recall: the reference has no features")
                p, r = precision_recall(ref.features, fake, k=cfg.pr_k, device=self.device)
                metrics["eval/precision"], metrics["eval/recall"] = p, r
            seconds = time.perf_counter() - t0
            metrics["eval/seconds"] = seconds
            if pool is not None and pool.count:
                try:
                    save_sample_grid(pool.cells(), grid_path)
                except (OSError, ValueError) as err:
                    warnings.warn(f"could not save the sample grid {grid_path}: {err}", RuntimeWarning)
            metrics["eval/samples_per_s"] = cfg.num_samples / seconds if seconds > 0 else 0.0
        return _broadcast(metrics)


def evaluate(
    model: Any,
    cfg: EvalConfig,
    data: Any,
    *,
    diffusion: Any = None,
    device: torch.device | str = "cpu",
    random_flip: bool = False,
    extractor: FeatureExtractor | None = None,
    reference: Reference | None = None,
    grid_path: str | Path | None = None,
) -> dict[str, float]:
    """One evaluation of ``model`` outside the training loop (``data``: a manifest or its path).

    ``diffusion`` defaults to the paper's (1000 linear steps, learned sigma as the model has).
    Runs on every rank of an initialised process group, or alone. ``grid_path``: also save a
    PNG grid of samples there (rank 0).
    """
    from dit.diffusion import create_diffusion
    from dit.latents import Manifest

    manifest = data if hasattr(data, "latent_shape") else Manifest.load(data)
    if diffusion is None:
        diffusion = create_diffusion(learn_sigma=bool(getattr(model, "learn_sigma", True)))
    ev = Evaluator(cfg, manifest=manifest, diffusion=diffusion, device=device, random_flip=random_flip,
                   extractor=extractor, reference=reference)
    return ev.run(model, grid_path=grid_path)


def load_checkpoint_model(directory: str | Path, device: torch.device | str = "cpu") -> Any:
    """The EMA model of a ditscale training checkpoint, in eval mode."""
    from dit.models import create_model

    directory = Path(directory)
    state_file, ema_file = directory / "trainer_state.json", directory / "ema.pt"
    if not state_file.is_file() or not ema_file.is_file():
        raise ConfigError(f"{str(directory)!r} is not a ditscale checkpoint (trainer_state.json, ema.pt)")
    state = json.loads(state_file.read_text())
    model = create_model(state["model"])
    model.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=True), strict=True)
    return model.to(device).eval()
