"""``ditscale prepare``: encode a data set into WebDataset latent shards.

    ditscale prepare digits --out data/digits16 [--image-size 16]
    ditscale prepare folder IMAGES --out data/in256 --vae stabilityai/sd-vae-ft-ema --image-size 256

Encoding fans out over Ray (``orchestrator.prepare``: one encoder actor per GPU, else per
CPU); the driver assembles ``DIR/manifest.json`` at the end. ``--local`` encodes in this
process (no Ray). With ``--address``/``RAY_ADDRESS`` the job joins that cluster (image folder
and ``--out`` must then be on storage every node sees); otherwise a private local Ray instance
is started, bound to 127.0.0.1. Rerunning the same command resumes: finished shards are
skipped. ``prepare digits`` also trains the small classifier whose features give digits FID
(``DIR/features/digits_classifier.pt``; ``--no-features`` skips it).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def _parse_bytes(text: str) -> int:
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64MB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[unit])


def _common(p: argparse.ArgumentParser, *, vae_required: bool, default_vae: str | None, default_size: int) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (shards + manifest.json)")
    p.add_argument("--image-size", type=int, default=default_size, help=f"pixels after the ADM centre crop (default {default_size})")
    p.add_argument(
        "--vae", required=vae_required, default=default_vae, metavar="ID_OR_PATH",
        help="AutoencoderKL hub id (stabilityai/sd-vae-ft-ema, …) or local folder; 'identity' keeps pixels as latents",
    )
    p.add_argument("--latent-dist", choices=("mean", "sample"), default="mean", help="VAE posterior mean or a seeded sample (default mean)")
    p.add_argument("--scale-factor", type=float, default=None, help="override the latent scale factor (default: the VAE config's, 0.18215 for SD)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=None, metavar="N", help="samples per shard (default: up to 1024, at least 16 shards)")
    size.add_argument("--shard-bytes", type=_parse_bytes, default=None, metavar="SIZE", help="target shard size, e.g. 256MB")
    p.add_argument("--no-flip", action="store_true", help="do not store the latent of the horizontally flipped image")
    p.add_argument("--seed", type=int, default=0, help="seed of the input→shard assignment and of latent sampling (default 0)")
    p.add_argument("--encode-batch", type=int, default=32, metavar="N", help="images per encoder call (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace shards in --out made with other settings")
    p.add_argument("--local", action="store_true", help="encode in this process, without Ray (small data)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a private local instance)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance / encoder actors (default: all)")
    p.add_argument("--device", default=None, help="encoder device for --local (default: cuda if available, else cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prepare_source", metavar="SOURCE", required=True)
    d = sub.add_parser("digits", help="scikit-learn's bundled handwritten digits (1,797 images, 10 classes, no download)",
                       description="Built-in demo data: sklearn digits upscaled to --image-size, 1 channel.")
    _common(d, vae_required=False, default_vae="identity", default_size=16)
    d.add_argument("--no-features", action="store_true",
                   help="skip training the small digits classifier behind digits FID (eval.features: digits-cnn-v1)")
    f = sub.add_parser("folder", help="an image folder in ImageNet layout (IMAGES/<class>/<image>)",
                       description="Encode IMAGES/<class>/<image>; class index = sorted folder order.")
    f.add_argument("images", metavar="IMAGES", help="folder with one subfolder per class")
    _common(f, vae_required=True, default_vae=None, default_size=256)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(args: argparse.Namespace) -> int:
    from dit.evaluate.features import digits_feature_nets
    from dit.latents import ImageFolderSource, begin_prepare, make_digits
    from dit.vae import load_codec
    from orchestrator.prepare import encode_on_ray, print_progress

    if args.prepare_source == "digits":
        source = make_digits(args.image_size)
    else:
        source = ImageFolderSource(args.images, args.image_size)
    device = args.device or (_default_device() if args.local else "cpu")
    codec = load_codec(args.vae, latent_dist=args.latent_dist, scale_factor=args.scale_factor, device=device)
    job = begin_prepare(
        source, codec, args.out,
        shard_size=args.shard_size, shard_bytes=args.shard_bytes, flip=not args.no_flip,
        shuffle_seed=args.seed, encode_seed=args.seed, encode_batch=args.encode_batch, overwrite=args.overwrite,
        feature_nets=None if getattr(args, "no_features", False) else digits_feature_nets,
    )
    total = job.plan.num_shards
    print(f"prepare {args.prepare_source}: {len(source)} inputs → {total} shards of ≤{job.plan.shard_size} in {job.out_dir} "
          f"(encoder {codec.encoder_id}, latents {job.latent_shape}); {total - len(job.pending)} already complete", flush=True)
    if job.pending:
        if args.local:
            t0 = time.time()
            job.run_local(codec, lambda d, n, rec: print_progress(d, n, rec, t0))
        else:
            del codec  # actors load their own
            encode_on_ray(job, address=args.address, num_cpus=args.num_cpus)
    _print_manifest(job.finish())
    return 0


def _print_manifest(manifest) -> None:
    print(f"wrote {manifest.url}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
          f"latents {manifest.latent_shape} float16 × {manifest.scale_factor}, {manifest.num_skipped_inputs} inputs skipped",
          flush=True)
    for name, rec in manifest.features.items():
        print(f"feature network {name}: {rec['path']} (held-out accuracy {rec.get('heldout_accuracy')})", flush=True)
    if manifest.skipped_inputs:
        for s in manifest.skipped_inputs[:10]:
            print(f"  skipped {s['key']}: {s['error']}", file=sys.stderr)
