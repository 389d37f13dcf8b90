"""Spec problems: collected as ``field.path: message`` lines, raised as one ConfigError naming the file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from dit.errors import ConfigError


def _loc(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _join(base: str, loc: Sequence[Any]) -> str:
    for p in loc:
        base += f"[{p}]" if isinstance(p, int) else f".{p}"
    return base


def _msg(e: Mapping[str, Any]) -> str:
    return str(e["msg"]).removeprefix("Value error, ")


def _errors(err: ValidationError, prefix: Sequence[Any] = ()) -> list[str]:
    return [f"{_loc([*prefix, *e['loc']])}: {_msg(e)}" for e in err.errors()]


class _Problems:
    def __init__(self, source: str):
        self.source, self.lines = source, []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(f"{self.source}: {line}" for line in dict.fromkeys(self.lines)))
