"""Evaluation throughput on CPU: the sampler, the feature extractors, merging and scoring statistics.

* sampler: samples/s of ``dit.evaluate.generate`` (respaced DDPM / DDIM at ``--steps``, one
  chunk of ``--batch`` samples, classifier-free guidance optional) for a tiny DiT on 8x8x1
  latents (the digits demo) and DiT-S/8 on 32x32x4 latents (256 px through the SD VAE), with
  untrained weights (the cost does not depend on them); no decoding (pixels as latents).
* features: images/s of the ``digits-cnn-v1`` network on 8 px images, quantization included,
  and of Inception-v3 (``inception-v3-tf``, 299 px) when pytorch-fid/torchvision and its
  weights are present; else the row says why it was skipped.
* statistics: 2048-d features (Inception's pool3) on two simulated ranks: ``FeatureStats``
  update per 1k features, the merge, mean + covariance, and the Fréchet distance against a
  2048-d reference (``scipy.linalg.sqrtm``, as pytorch-fid / ADM). Target: merge + score < 2 s.
  For comparison, the same distance from two symmetric eigensolves (not what dit.evaluate.fid uses).

Each timing is the median of ``--repeats`` runs after one warm-up (none for the Fréchet distance
with ``--quick``); the machine may be shared.

    python benchmarks/bench_eval.py            # full run (a few minutes)
    python benchmarks/bench_eval.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.diffusion import create_diffusion  # noqa: E402
from dit.errors import ConfigError  # noqa: E402
from dit.evaluate import EvalConfig, features_of as _features_of, generate  # noqa: E402
from dit.evaluate.features import DIGITS, DigitsCNN, ModuleExtractor  # noqa: E402
from dit.evaluate.fid import FeatureStats, frechet_distance  # noqa: E402
from dit.models import create_model  # noqa: E402

TINY = ({"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}, dict(input_size=8, in_channels=1, num_classes=10))
S8 = ("DiT-S/8", dict(input_size=32, in_channels=4, num_classes=1000))


def timed(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_sampler(quick: bool, repeats: int, steps: int, batch: int) -> list[tuple[str, str, str]]:
    rows = []
    diffusion = create_diffusion()
    cases = [("tiny d2 h64 p2, 8x8x1", TINY, "ddpm", 1.0), ("tiny d2 h64 p2, 8x8x1", TINY, "ddim", 1.0),
             ("DiT-S/8, 32x32x4", S8, "ddpm", 1.0), ("DiT-S/8, 32x32x4", S8, "ddim", 1.0)]
    if not quick:
        cases += [("DiT-S/8, 32x32x4", S8, "ddim", 1.5)]
    for label, (spec, overrides), sampler, cfg_scale in cases:
        torch.manual_seed(0)
        model = create_model(spec, **overrides).eval()
        cfg = EvalConfig(enabled=True, num_samples=batch, batch_size=batch, sampler=sampler, steps=steps,
                         cfg_scale=cfg_scale)
        shape = (overrides["in_channels"], overrides["input_size"], overrides["input_size"])

        def run() -> None:
            for _ in generate(model, diffusion, cfg, latent_shape=shape, num_classes=overrides["num_classes"]):
                pass

        sec = timed(run, repeats)
        what = f"{sampler} {steps} steps" + (f", cfg {cfg_scale:g}" if cfg_scale != 1 else "")
        rows.append((f"sampler: {label}", what, f"{batch / sec:,.1f} samples/s ({sec * 1e3 / steps:.1f} ms/step, batch {batch})"))
    return rows


def bench_features(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    rows = []
    torch.manual_seed(0)
    net = DigitsCNN()
    from dit.evaluate.features import _Features

    ext = ModuleExtractor(_Features(net), name=DIGITS, dim=64, input_size=8, channels=1, logits=net.head,
                          num_classes=10)
    n = 512 if quick else 2048
    images = torch.rand(n, 1, 8, 8) * 2 - 1
    sec = timed(lambda: _features_of(images, ext, True), repeats)
    rows.append(("features: digits-cnn-v1", f"{n} images, 8 px", f"{n / sec:,.0f} images/s"))
    try:
        import torchvision  # noqa: F401
    except Exception as err:
        rows.append(("features: inception-v3-tf", "-", f"skipped: torchvision unavailable ({type(err).__name__})"))
        return rows
    try:
        from dit.evaluate.features import InceptionExtractor

        inc = InceptionExtractor()
    except (ConfigError, ImportError) as err:
        rows.append(("features: inception-v3-tf", "-", f"skipped: {str(err).splitlines()[0][:80]}"))
        return rows
    n = 16 if quick else 64
    images = torch.rand(n, 3, 32, 32) * 2 - 1
    sec = timed(lambda: _features_of(images, inc, True), max(1, repeats // 2))
    rows.append(("features: inception-v3-tf", f"{n} images, 32 px -> 299", f"{n / sec:,.1f} images/s"))
    return rows


def bench_statistics(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    d, k = 2048, 64
    n = 1100 if quick else 5000  # per rank; 2 n > d keeps the covariance full rank
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(k, d, generator=g)  # features: a 64-d structure plus isotropic noise
    feats = [torch.relu(torch.randn(n, k, generator=g) @ basis + 0.5 * torch.randn(n, d, generator=g)) for _ in range(2)]
    low = torch.randn(d, k, generator=g).double().numpy() / np.sqrt(k)
    ref_mu, ref_sigma = np.full(d, 0.5), low @ low.T + np.diag(np.linspace(0.2, 1.0, d))
    ranks = [FeatureStats(d), FeatureStats(d)]
    t0 = time.perf_counter()
    for r in range(2):
        for chunk in torch.split(feats[r], 1000):
            ranks[r].update(chunk)
    update = (time.perf_counter() - t0) / (2 * n / 1000)

    def merge() -> FeatureStats:
        out = FeatureStats(d)
        for r in ranks:
            out.merge(r)
        return out

    t_merge = timed(merge, repeats)
    merged = merge()
    t_moments = timed(lambda: (merged.mean(), merged.cov()), repeats)
    mu, sigma = merged.mean(), merged.cov()
    fd_repeats = 1 if quick else repeats
    scored: list[float] = []
    t_fd = timed(lambda: scored.append(frechet_distance(mu, sigma, ref_mu, ref_sigma).fid), fd_repeats, warmup=not quick)
    total = t_merge + t_moments + t_fd
    verdict = "ok" if total < 2.0 else "over the 2 s target"

    def eig_fid() -> float:  # Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): symmetric eigensolves only
        w, v = np.linalg.eigh(sigma)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        lam = np.linalg.eigvalsh(root @ ref_sigma @ root)
        diff = mu - ref_mu
        return float(diff @ diff + np.trace(sigma) + np.trace(ref_sigma) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())

    t_eig = timed(eig_fid, fd_repeats, warmup=not quick)
    ref_fid = scored[-1]
    rel = abs(eig_fid() - ref_fid) / abs(ref_fid)
    return [
        ("stats: update (2048-d)", "per 1k features, float64", f"{update * 1e3:.1f} ms"),
        ("stats: merge 2 ranks", "count, sum, outer", f"{t_merge * 1e3:.1f} ms"),
        ("stats: mean + cov", "2048x2048", f"{t_moments * 1e3:.1f} ms"),
        ("stats: Frechet distance", "scipy sqrtm 2048x2048", f"{t_fd * 1e3:.0f} ms"),
        ("stats: merge + score", f"{2 * n} features", f"{total:.2f} s ({verdict})"),
        ("stats: Frechet via eigh (not used)", "symmetric eigensolves", f"{t_eig * 1e3:.0f} ms (rel. diff {rel:.1e})"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and repeats: under a minute")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; --quick 10)")
    ap.add_argument("--batch", type=int, default=None, help="samples per sampler call (default 32; --quick 16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3; --quick 1)")
    ap.add_argument("--only", nargs="+", choices=["sampler", "features", "stats"], help="run only these parts")
    args = ap.parse_args()
    steps = args.steps or (10 if args.quick else 50)
    batch = args.batch or (16 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    widths = (36, 26)
    print(f"{'what':<{widths[0]}}  {'setup':<{widths[1]}}  result")
    parts = {"sampler": lambda: bench_sampler(args.quick, repeats, steps, batch),
             "features": lambda: bench_features(args.quick, repeats),
             "stats": lambda: bench_statistics(args.quick, repeats)}
    for name in args.only or list(parts):
        for r in parts[name]():  # rows as each part finishes
            print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}", flush=True)


if __name__ == "__main__":
    main()
