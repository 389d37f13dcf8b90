"""``ditscale export CHECKPOINT OUT``: a trial checkpoint -> EMA weights in the official layout."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a trial checkpoint folder (holds ema.pt)")
    parser.add_argument("out", help="output .pt: the EMA weights as a plain state dict (official layout)")


def main(args: argparse.Namespace) -> int:
    from dit.train.checkpoint import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
    return 0
