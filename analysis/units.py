"""Readable units for the numbers a reader skims: flops, parameter counts, training compute.

The project's "Gflops" are fvcore's, which count a multiply-add as one flop (the DiT paper's
convention); a training FLOP count in the usual sense (multiplies and adds apart) is twice
that. Every axis and label that shows compute says so, through :data:`COMPUTE_LABEL`.

No matplotlib at import: ``orchestrator.progress`` prints with :func:`format_flops` on the
driver, which should not pay for a plotting library. The tick formatters import it when asked.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["COMPUTE_LABEL", "FORWARD_LABEL", "PARAMS_LABEL", "compute_label", "flops_formatter",
           "format_flops", "format_params", "params_formatter"]

_FLOP_UNITS = ("", "K", "M", "G", "T", "P", "E", "Z")
_COUNT_UNITS = ("", "K", "M", "B", "T")

FORWARD_LABEL = "Transformer forward flops per image (multiply-adds)"
PARAMS_LABEL = "parameters"


def compute_label(what: str = "training compute") -> str:
    """An axis label for compute in the project's Gflops, with the conversion to FLOPs."""
    return f"{what} (flops as multiply-adds; FLOPs = 2×)"


COMPUTE_LABEL = compute_label()


def _scaled(value: float, units: tuple[str, ...], sig: int) -> tuple[str, str]:
    """(mantissa text, unit) with the mantissa below 1000 once rounded (999.7 -> '1' 'K')."""
    for unit in units:
        if abs(value) < 10**3 - 0.5 * 10 ** (3 - sig) or unit == units[-1]:
            return f"{value:.{sig}g}", unit
        value /= 1e3
    raise AssertionError("unreachable")


def format_flops(gflops: float) -> str:
    """Gflops in readable units at every scale: 0.000412 -> '412 Kflops', 118.6 -> '119 Gflops'."""
    if gflops is None or not math.isfinite(float(gflops)):
        return "? flops"
    text, unit = _scaled(float(gflops) * 1e9, _FLOP_UNITS, 3)
    return f"{text} {unit}flops"


def format_params(n: Any) -> str:
    """A parameter count in readable units: 12345 -> '12.3K', 1_050_000 -> '1.05M',
    675_000_000 -> '675M', 1_200_000_000 -> '1.2B', 512 -> '512'."""
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(value):
        return "?"
    text, unit = _scaled(value, _COUNT_UNITS, 3)
    return text + unit


def _log_tick_text(value: float, fmt) -> str:
    # Only decades (and 2x/5x where a locator asks for them) get a label: the in-between minor
    # ticks of a log axis would crowd the axis with long unit strings.
    if value <= 0 or not math.isfinite(value):
        return ""
    return fmt(value)


def flops_formatter() -> Any:
    """A matplotlib tick formatter for an axis in the project's Gflops: '10 Kflops', '1 Pflops'."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: _log_tick_text(v, format_flops))


def params_formatter() -> Any:
    """A matplotlib tick formatter for an axis of parameter counts: '10K', '1M', '1B'."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: _log_tick_text(v, format_params))
