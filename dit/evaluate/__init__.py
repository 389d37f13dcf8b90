"""Evaluation on every worker of a trial: sample with the EMA weights -> decode -> features -> FID.

Sampling (:mod:`dit.evaluate.sampling`). ``num_samples`` images are cut into fixed chunks of
``batch_size``; chunk ``c`` goes to rank ``c % world_size`` and is drawn from its own generator
seeded by ``(seed, c)`` (x_T and every step's noise), with its slice of one global label list.
So the same EMA weights give the same images whatever the worker count (for a fixed
``batch_size``). Labels are exactly balanced by default (each class ``num_samples /
num_classes`` times, in a seeded order) or uniform-random like the reference ``sample_ddp.py``
(``labels: uniform``). The sampler is respaced DDPM (250 steps, the paper) or DDIM (``eta``);
classifier-free guidance with ``cfg_scale`` (1 = none, the paper's headline 1.5) on all latent
channels, or on the first three as the reference code did (``cfg_channels: first3``). Latents
are decoded with the codec the manifest names (``decode(z, scaled=True)``: the model space is
the stored latents x the manifest's scale factor).

Features and FID (:mod:`dit.evaluate.features`, :mod:`dit.evaluate.fid`). Images are quantized to 8
bits (as saving PNGs would; ``quantize``) and handed to a feature extractor. Each rank keeps
only mergeable sums (:class:`FeatureStats`), all-reduced once; rank 0 computes the Fréchet
distance against the reference statistics (:mod:`dit.evaluate.reference`), which come from an
ADM-style ``.npz`` (``mu``, ``sigma``) or are computed once from the real latents behind a
manifest (decoded the same way, split across the ranks, cached next to the manifest as
``features/reference-<extractor>-<key>.npz``). Optional: Inception Score (extractors with
logits; mergeable sums too) and k-NN precision/recall (features of up to ``pr_samples`` images
gathered to rank 0).

Sample grids (:mod:`dit.evaluate.grids`). ``Evaluator.run(model, grid_path=...)`` also writes a PNG
of rank 0's first samples (class-balanced: one row per class when there are at most 16
classes, else the first 64 distinct classes), upscaled with nearest-neighbour so each cell is
at least 64 px.

Evaluation never draws from the global RNG (it runs under ``fork_rng`` and seeded generators),
so training after an evaluation is bit-identical to training without one. This package knows
nothing of training (``dit.train`` imports it, never the reverse), Ray or MLflow.
"""

from dit.evaluate.config import EvalConfig, eval_tags
from dit.evaluate.evaluator import Evaluator, evaluate
from dit.evaluate.fid import ClassStats, FeatureStats, FrechetResult, frechet_distance, load_statistics, precision_recall, save_statistics
from dit.evaluate.grids import grid_layout, sample_grid, sample_grid_path, save_sample_grid
from dit.evaluate.reference import Reference, reference_statistics
from dit.evaluate.sampling import class_labels, clips_denoised, features_of, generate, quantize_images, rank_chunks

__all__ = [
    "ClassStats",
    "EvalConfig",
    "Evaluator",
    "FeatureStats",
    "FrechetResult",
    "Reference",
    "class_labels",
    "clips_denoised",
    "eval_tags",
    "evaluate",
    "features_of",
    "frechet_distance",
    "generate",
    "grid_layout",
    "load_statistics",
    "precision_recall",
    "quantize_images",
    "rank_chunks",
    "reference_statistics",
    "sample_grid",
    "sample_grid_path",
    "save_sample_grid",
    "save_statistics",
]
