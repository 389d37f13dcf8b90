"""What every spec section shares: strict models (unknown fields are errors) and name rules."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]
