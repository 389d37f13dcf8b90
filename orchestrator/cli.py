"""The ``ditscale`` command.

Each subcommand lives in the module that owns its concern and exposes
``add_arguments(parser)`` and ``main(args) -> int``; this file only wires them up and
turns user errors into a message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from dit.errors import ConfigError

# name -> (module, one-line help). Modules are imported lazily so `ditscale --help`
# does not pay for importing Ray, DeepSpeed and MLflow.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("orchestrator.flops_cli", "Gflops and parameter table for models or a study spec"),
    "prepare": ("orchestrator.prepare", "encode a data set into WebDataset latent shards"),
    "train": ("orchestrator.train_cli", "run one trial (one model) with Ray Train + DeepSpeed"),
    "export": ("orchestrator.export_cli", "export a checkpoint's EMA weights as a plain state dict"),
}

EXIT_USAGE = 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="ditscale", description="Scaling studies for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args._main(args) or 0)
    except ConfigError as err:
        print(f"ditscale {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
