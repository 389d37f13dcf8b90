"""Reading a spec: ``load_spec`` (a YAML file) and ``parse_spec`` (already parsed), both expanding it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dit.errors import ConfigError
from orchestrator.spec.data import _resolve_data
from orchestrator.spec.expand import _expand
from orchestrator.spec.model import StudySpec
from orchestrator.spec.problems import _errors


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read, validate and expand a study spec; any problem is a ConfigError naming the field."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read study spec: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not a text file ({err.reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}".rstrip()) from None
    return parse_spec(raw, source=source, base_dir=path.resolve().parent)


def parse_spec(raw: Any, *, source: str = "spec", base_dir: str | os.PathLike[str] | None = None) -> StudySpec:
    """Validate and expand an already-parsed spec (``base_dir``: where relative manifests live)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping with name, data, grid, recipe, ...")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n".join(f"{source}: {line}" for line in _errors(err))) from None
    spec._source = source
    spec._base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    spec._data = _resolve_data(spec.data, spec.source, spec._base_dir)
    spec._cells = _expand(spec)
    return spec
