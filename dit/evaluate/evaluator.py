"""The evaluator: sample with the EMA weights -> decode -> features -> FID, on every rank.

Each rank keeps only mergeable sums (:class:`dit.evaluate.fid.FeatureStats`), all-reduced once;
rank 0 computes the Fréchet distance against the reference statistics
(:mod:`dit.evaluate.reference`) and broadcasts its metrics. Optional: Inception Score (extractors
with logits; mergeable sums too) and k-NN precision/recall (features of up to ``pr_samples``
images gathered to rank 0). Evaluation never draws from the global RNG (it runs under
``fork_rng`` and seeded generators), so training after an evaluation is bit-identical to
training without one.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit.errors import ConfigError
from dit.evaluate.collectives import broadcast, gather, world
from dit.evaluate.config import EvalConfig
from dit.evaluate.features import FeatureExtractor, load_extractor
from dit.evaluate.fid import ClassStats, FeatureStats, frechet_distance, precision_recall
from dit.evaluate.grids import _GridPool, save_sample_grid
from dit.evaluate.reference import Reference, reference_statistics
from dit.evaluate.sampling import features_of, generate, quantize_images

__all__ = ["Evaluator", "evaluate"]


@dataclass
class _Sampled:
    """What one rank keeps of its samples: mergeable sums, a few features, the grid's images."""

    stats: FeatureStats
    classes: ClassStats | None
    pool: _GridPool | None
    kept: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    gathered: list[Any] | None = None


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
        self.rank, self.world = world()
        self._ready = False

    def _fork(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def setup(self) -> "Evaluator":
        if self._ready:
            return self
        cfg = self.cfg
        with torch.random.fork_rng(devices=self._fork()):
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
        t0 = time.perf_counter()
        sampled = self._sample(model, keep_grid=grid_path is not None and self.rank == 0)
        sampled.stats.all_reduce()
        if sampled.classes is not None:
            sampled.classes.all_reduce()
        sampled.gathered = gather(sampled.kept) if self.cfg.precision_recall else None
        metrics = self._score(sampled, t0, grid_path) if self.rank == 0 else None
        return broadcast(metrics)

    def _sample(self, model: Any, keep_grid: bool) -> _Sampled:
        """This rank's samples, reduced to sums as they come (the model is put back in its mode)."""
        cfg, ext, m = self.cfg, self.extractor, self.manifest
        assert ext is not None
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        want_is = cfg.inception_score and ext.num_classes > 0
        out = _Sampled(FeatureStats(ext.dim, self.device), ClassStats(ext.num_classes, self.device) if want_is else None,
                       _GridPool(m.num_classes) if keep_grid else None)
        with torch.random.fork_rng(devices=self._fork()):
            for lo, _hi, images, y in generate(
                model, self.diffusion, cfg, latent_shape=tuple(m.latent_shape), num_classes=m.num_classes,
                device=self.device, codec=self.codec, rank=self.rank, world_size=self.world,
            ):
                if out.pool is not None and not out.pool.full:
                    out.pool.add(quantize_images(images.float()) if cfg.quantize else images, y)
                feats, logits = features_of(images, ext, cfg.quantize, logits=want_is)
                out.stats.update(feats)
                if out.classes is not None and logits is not None:
                    out.classes.update(logits)
                if cfg.precision_recall and lo < cfg.pr_samples:
                    out.kept.append((lo, feats[: cfg.pr_samples - lo].float().cpu()))
        if was_training and hasattr(model, "train"):
            model.train()
        return out

    def _score(self, sampled: _Sampled, t0: float, grid_path: str | Path | None) -> dict[str, float]:
        """Rank 0's metrics from the merged sums (and the grid saved, if one was asked for)."""
        cfg, ref = self.cfg, self.reference
        assert ref is not None
        fd = frechet_distance(sampled.stats.mean(), sampled.stats.cov(), ref.mu, ref.sigma)
        metrics = {"eval/fid": fd.fid, "eval/fid_sqrtm_imag": fd.imag}
        if sampled.classes is not None:
            metrics["eval/inception_score"] = sampled.classes.inception_score()
        if sampled.gathered is not None:
            parts = sorted((p for r in sampled.gathered for p in r), key=lambda p: p[0])
            fake = torch.cat([p[1] for p in parts])
            if ref.features is None:
                raise ConfigError("precision/recall: the reference has no features")
            p, r = precision_recall(ref.features, fake, k=cfg.pr_k, device=self.device)
            metrics["eval/precision"], metrics["eval/recall"] = p, r
        seconds = time.perf_counter() - t0
        metrics["eval/seconds"] = seconds
        pool = sampled.pool
        if pool is not None and pool.count:
            try:
                save_sample_grid(pool.cells(), grid_path)
            except (OSError, ValueError) as err:
                warnings.warn(f"could not save the sample grid {grid_path}: {err}", RuntimeWarning)
        metrics["eval/samples_per_s"] = cfg.num_samples / seconds if seconds > 0 else 0.0
        return metrics


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
