"""Reference statistics: what generated features are compared against.

They come from an ADM-style ``.npz`` (``mu``, ``sigma``) or are computed once from the real
latents behind a manifest (decoded the same way as samples, split across the ranks, cached next
to the manifest as ``features/reference-<extractor>-<key>.npz``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit.errors import ConfigError
from dit.evaluate.collectives import gather, on_rank0, world
from dit.evaluate.config import EvalConfig
from dit.evaluate.features import FeatureExtractor
from dit.evaluate.fid import FeatureStats, load_statistics, save_statistics
from dit.evaluate.sampling import features_of

__all__ = ["REFERENCE_VERSION", "Reference", "reference_statistics"]

REFERENCE_VERSION = 1


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


def _manifest_statistics(manifest: Any, cfg: EvalConfig, extractor: FeatureExtractor, codec: Any,
                         device: torch.device, flip: bool, keep: int) -> tuple[FeatureStats, np.ndarray | None]:
    """Statistics of the real latents of a manifest (each sample once, in the seeded stream order),
    this rank's share of the batches, all-reduced; the first ``keep`` features gathered on rank 0."""
    from dit.latents import LatentStream

    rank, size = world()
    total = min(manifest.num_samples, cfg.reference_samples or manifest.num_samples)
    B = cfg.batch_size
    stream = LatentStream(manifest, B, rank=0, world_size=1, seed=0, shuffle_buffer=0, random_flip=flip,
                          epoch_length=math.ceil(total / B))
    stats, kept = FeatureStats(extractor.dim, device), []
    for i, (lat, _) in enumerate(stream):
        lo = i * B
        if i % size != rank or lo >= total:
            continue
        images = codec.decode(lat[: total - lo].to(device), scaled=True)
        feats, _ = features_of(images, extractor, cfg.quantize)
        stats.update(feats)
        if lo < keep:
            kept.append((lo, feats[: keep - lo].float().cpu()))
    stats.all_reduce()
    gathered = gather(kept) if keep else None
    feats = None
    if gathered is not None and keep:
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
        feats = torch.cat([p[1] for p in parts]).numpy() if parts else None
    return stats, feats


def _npz_features(ref: str, data: dict[str, np.ndarray], cfg: EvalConfig, extractor: FeatureExtractor,
                  device: torch.device) -> np.ndarray:
    """The real features for precision/recall: stored ones, else those of the ADM image batch."""
    if "features" in data:
        return data["features"][: cfg.pr_samples]
    if "images" not in data:
        raise ConfigError(f"eval.reference {ref!r}: precision/recall needs 'features' or the images 'arr_0'")
    imgs = data["images"][: cfg.pr_samples]  # ADM reference batch: uint8 NHWC
    parts = []
    for lo in range(0, len(imgs), cfg.batch_size):
        x = torch.from_numpy(np.ascontiguousarray(imgs[lo : lo + cfg.batch_size]))
        x = x.permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
        parts.append(features_of(x, extractor, False)[0].float().cpu())
    return torch.cat(parts).numpy()


def _npz_reference(ref: str, cfg: EvalConfig, extractor: FeatureExtractor, device: torch.device) -> Reference:
    """An ADM-style ``.npz``, checked against the extractor (read on rank 0 only)."""
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
    feats = _npz_features(ref, data, cfg, extractor, device) if cfg.precision_recall else None
    count = int(data["count"]) if "count" in data else 0
    return Reference(mu, sigma, count, str(ref), feats)


def _cached_reference(path: Path, cfg: EvalConfig) -> Reference | None:
    if not path.is_file():
        return None
    try:
        data = load_statistics(path)
    except ConfigError:
        return None  # damaged: compute again
    feats = data.get("features") if cfg.precision_recall else None
    return Reference(data["mu"], data["sigma"], int(data.get("count", 0)), str(path), feats)


def _manifest_reference(cfg: EvalConfig, manifest: Any, extractor: FeatureExtractor, codec: Any,
                        device: torch.device, random_flip: bool) -> Reference | None:
    """Statistics of a manifest's real data: rank 0's cache, else computed by every rank (and cached)."""
    from dit.latents import Manifest

    ref = cfg.reference
    m = Manifest.load(ref) if ref else manifest
    if codec is None or ref:
        codec = m.load_codec(device=device)
    flip = bool(random_flip and m.flip)
    path = _reference_path(m, cfg, extractor, flip)
    hit, found = on_rank0(lambda: _cached_reference(path, cfg))
    if found:
        return hit
    keep = min(cfg.pr_samples, m.num_samples) if cfg.precision_recall else 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        stats, feats = _manifest_statistics(m, cfg, extractor, codec, device, flip, keep)
    if world()[0] != 0:
        return None
    out = Reference(stats.mean(), stats.cov(), stats.count, str(path), feats)
    try:
        save_statistics(path, out.mu, out.sigma, count=np.int64(out.count), extractor=np.str_(extractor.name),
                        features=feats, source=np.str_(m.url or ""))
    except OSError as err:  # a read-only data folder: keep going without the cache
        warnings.warn(f"could not cache reference statistics at {path}: {err}", RuntimeWarning)
    return out


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
    ref = cfg.reference
    if ref and _is_npz(ref):
        return on_rank0(lambda: _npz_reference(ref, cfg, extractor, device))[0]
    return _manifest_reference(cfg, manifest, extractor, codec, device, random_flip)
