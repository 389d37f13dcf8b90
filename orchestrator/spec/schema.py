"""The spec's JSON Schema (``ditscale schema``), for editor completion and validation."""

from __future__ import annotations

from typing import Any

from dit.models import SIZES
from orchestrator.spec.model import StudySpec


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of a study spec (``ditscale schema``), for editor completion."""
    schema = StudySpec.model_json_schema()
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ditscale study spec",
        **{k: v for k, v in schema.items() if k != "title"},
    }
    # A size is also written as a bare name: S, B, L, XL.
    grid = schema["$defs"]["Grid"]["properties"]
    item = grid["size"]["items"]
    grid["size"]["items"] = {"anyOf": [{"type": "string", "enum": list(SIZES)}, item]}
    return schema
