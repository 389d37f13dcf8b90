"""Cell names: ``DiT-<size>-<patch>`` plus the block and recipe axes that set the cell apart.

A name depends only on the cell's own values and the axis declarations, never on which other
cells exist, so adding an ``include`` or ``exclude`` never renames an existing trial.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from orchestrator.spec.model import DEFAULT_BLOCK, SizeEntry

# Short labels for recipe axes in cell names (other fields use their own name).
AXIS_LABELS = {
    "global_batch": "bs",
    "micro_batch": "mb",
    "weight_decay": "wd",
    "ema_decay": "ema",
    "warmup_steps": "warmup",
    "class_dropout_prob": "cdrop",
    "zero_stage": "zero",
    "noise_schedule": "",
    "precision": "",
}


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            mantissa, exp = f"{value:.6e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exp)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt_value(v) for v in value)
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _label(key: str, value: Any) -> str:
    return _safe(AXIS_LABELS.get(key, key) + _fmt_value(value))


def cell_name(
    size: SizeEntry,
    patch: int,
    block: str,
    recipe: Mapping[str, Any],
    *,
    block_varies: bool,
    axes: Mapping[str, Sequence[Any]],
    base_value: Callable[[str], Any],
) -> str:
    """``DiT-<size>-<patch>``, then the block when the block axis has several values or is not
    the default, then each recipe axis ``<label><value>`` when it has several values or differs
    from the base recipe."""
    parts = [f"DiT-{_safe(size.name)}-{patch}"]
    if block_varies or block != DEFAULT_BLOCK:
        parts.append(block)
    for key, value in recipe.items():
        if len(axes.get(key, ())) > 1 or value != base_value(key):
            parts.append(_label(key, value))
    return "-".join(parts)
