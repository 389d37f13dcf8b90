"""``ditscale flops``: the Gflops / params table for named or custom models."""

from __future__ import annotations

import argparse
import json

from dit.models import MODEL_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help=f"model names (default: the paper's 12: {MODEL_NAMES[0]} ... {MODEL_NAMES[-1]})",
    )
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument(
        "--vae-factor", type=int, default=8, help="pixels per latent cell (8 for the SD VAE, 1 for pixels)"
    )
    parser.add_argument("--in-channels", type=int, default=4, help="latent channels (default 4)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes (default 1000)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def main(args: argparse.Namespace) -> int:
    from dit.errors import ConfigError
    from dit.flops import measure

    if args.image_size < 1 or args.vae_factor < 1 or args.image_size % args.vae_factor:
        raise ConfigError(
            f"--image-size ({args.image_size}) must be a positive multiple of --vae-factor ({args.vae_factor})"
        )
    reports = [
        measure(
            name,
            image_size=args.image_size,
            vae_factor=args.vae_factor,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
        )
        for name in (args.models or MODEL_NAMES)
    ]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
        return 0
    print(f"{'model':<12} {'image':>6} {'tokens':>7} {'Gflops':>10} {'params':>14}")
    for r in reports:
        print(f"{r.model:<12} {r.image_size:>6} {r.tokens:>7} {r.gflops:>10.2f} {r.params:>14,}")
    return 0
