"""``ditscale schema``: the study spec's JSON Schema, for editor completion and validation.

VS Code (YAML extension): ``ditscale schema --out studies/schema.json`` and put
``# yaml-language-server: $schema=schema.json`` at the top of a spec.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE", default=None, help="write the schema to FILE instead of stdout")


def main(args: argparse.Namespace) -> int:
    from dit.errors import ConfigError
    from orchestrator.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2) + "\n"
    if args.out is None:
        print(text, end="")
        return 0
    try:
        Path(args.out).write_text(text)
    except OSError as err:
        raise ConfigError(f"--out {args.out}: cannot write: {err.strerror or err}") from None
    print(f"wrote {args.out}")
    return 0
