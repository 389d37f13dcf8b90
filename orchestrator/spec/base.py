"""What every spec section shares: strict models (unknown fields are errors) and name rules."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    # No field takes inf or nan, and pydantic would otherwise read "1e999" as inf.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]
