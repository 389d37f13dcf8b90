"""Reading a spec: ``load_spec`` (a YAML file) and ``parse_spec`` (already parsed), both expanding it.

Both take ``for_run``: False (the default) for commands that only read a spec (``flops``,
``status``, ``cancel``), True for those about to run its cells (``run``, ``resume``,
``evaluate``). Only a run needs the checks that execute user code, so only a run gets them:
today that is importing an ``eval.features: "package.module:factory"`` extractor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dit.errors import ConfigError
from orchestrator.spec.data import _resolve_data
from orchestrator.spec.expand import _expand
from orchestrator.spec.limits import check_values
from orchestrator.spec.model import StudySpec
from orchestrator.spec.problems import _errors
from orchestrator.spec.yamlfile import read_yaml


def load_spec(path: str | os.PathLike[str], *, for_run: bool = False) -> StudySpec:
    """Read, validate and expand a study spec; any problem is a ConfigError naming the field.

    ``for_run``: also run the checks that import user code (see the module docstring)."""
    raw = read_yaml(path, "study spec")
    return parse_spec(raw, source=str(path), base_dir=Path(path).resolve().parent, for_run=for_run)


def parse_spec(
    raw: Any, *, source: str = "spec", base_dir: str | os.PathLike[str] | None = None, for_run: bool = False
) -> StudySpec:
    """Validate and expand an already-parsed spec (``base_dir``: where relative manifests live;
    ``for_run``: see the module docstring)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping with name, data, grid, recipe, ...")
    check_values(raw, source)  # before validation, which would expand an alias bomb
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n".join(f"{source}: {line}" for line in _errors(err))) from None
    spec._source = source
    spec._base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    spec._data = _resolve_data(spec.data, spec.source, spec._base_dir)
    spec._cells = _expand(spec, for_run=for_run)
    return spec
