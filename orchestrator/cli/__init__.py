"""The ``ditscale`` command.

Each subcommand lives in the module that owns its concern, as a pair of functions
``add_arguments(parser)`` and ``main(args) -> int`` (other names may be given below); this
file only wires them up and turns user errors (``ConfigError``) into one message and exit
code 2; anything else is a defect of ours and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from dit.errors import ConfigError

# name -> (module, one-line help[, add-arguments function, main function]). Modules are imported lazily so `ditscale --help`
# does not pay for importing Ray, DeepSpeed and MLflow.
SUBCOMMANDS: dict[str, tuple[str, ...]] = {
    "flops": ("orchestrator.cli.flops", "Gflops and parameter table for models or a study spec"),
    "prepare": ("orchestrator.cli.prepare", "encode a data set into WebDataset latent shards"),
    "run": ("orchestrator.cli.study", "run a study: every grid cell as a Ray Tune trial, tracked in MLflow"),
    "resume": ("orchestrator.cli.study", "finish an interrupted study (finished cells are not rerun)",
               "add_arguments", "resume_main"),
    "status": ("orchestrator.cli.study", "per-cell status of a study", "add_status_arguments", "status_main"),
    "cancel": ("orchestrator.cli.study", "stop a running study (resume continues it)", "add_status_arguments",
               "cancel_main"),
    "train": ("orchestrator.cli.train", "run one trial (one model) with Ray Train + DeepSpeed"),
    "export": ("orchestrator.cli.export", "export a checkpoint's EMA weights as a plain state dict"),
    "evaluate": ("orchestrator.cli.evaluate", "FID and other eval metrics of a checkpoint, outside a study"),
    "report": ("orchestrator.cli.report", "fit scaling laws, plot and write a study's report (or a published table's)"),
    "fit": ("orchestrator.cli.fit", "fit one scaling law (power, saturating, envelope) to a study or a CSV"),
    "schema": ("orchestrator.cli.schema", "print the study spec's JSON Schema (for editor completion)"),
}

EXIT_USAGE = 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="ditscale", description="Scaling studies for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text, *functions) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            add_name, main_name = functions or ("add_arguments", "main")
            module = importlib.import_module(module_name)
            getattr(module, add_name)(p)
            p.set_defaults(_main=getattr(module, main_name))
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
    except KeyboardInterrupt:
        print(f"ditscale {args.command}: interrupted; `ditscale resume` continues a study", file=sys.stderr)
        return 130
    except Exception as err:  # not the user's input: say what failed, keep the trace on request
        if os.environ.get("DITSCALE_DEBUG"):
            raise
        print(f"ditscale {args.command}: failed: {type(err).__name__}: {err}\n"
              "(set DITSCALE_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
