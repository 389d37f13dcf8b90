"""Uncertainty the fits share: resampling whole trials, intervals that say when a parameter is
not identified, prediction bands that contain confidence bands, and a robust outlier rule.

Why trials and not points: the evaluations along one training curve share the trial's seed,
data order and model, so their errors are correlated. Resampling points treats them as
independent and makes intervals too narrow; resampling whole trials (curves) keeps each
curve's correlation inside one draw.

Why "not identified": when the best fit or many resamples sit on a parameter's bound (an
asymptote E = 0 because the data show no saturation yet), a percentile interval of those
resamples is an artefact of the bound, not a statement about the data; it flips with the seed.
Such a parameter is reported as not identified, with how often it hit the bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A parameter is not identified when the best fit sits on a bound, or when more than this share
# of the bootstrap refits do.
AT_BOUND_LIMIT = 0.10
# MAD scaled to the standard deviation of a normal distribution.
MAD_TO_SD = 1.4826
OUTLIER_Z = 3.5  # robust z beyond which a residual is flagged (Iglewicz and Hoaglin's rule)


@dataclass(frozen=True)
class Interval:
    """A percentile interval at ``level``, or a parameter marked not identified."""

    lo: float
    hi: float
    level: float
    identified: bool = True
    at_bound: float = 0.0  # share of bootstrap refits on a bound
    bound: float | None = None  # the bound they hit (when not identified)

    def pair(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def text(self, fmt: str = "{:.4g}") -> str:
        if not self.identified:
            at = f" at {fmt.format(self.bound)}" if self.bound is not None else ""
            return f"not identified (on its bound{at} in {self.at_bound:.0%} of resamples)"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return "no interval (too few resamples)"
        return f"[{fmt.format(self.lo)}, {fmt.format(self.hi)}]"

    def to_json(self) -> dict[str, object]:
        """``interval`` is ``[lo, hi]`` when identified, else ``null``."""
        finite = self.identified and math.isfinite(self.lo) and math.isfinite(self.hi)
        return {"interval": [self.lo, self.hi] if finite else None, "level": self.level,
                "identified": self.identified, "at_bound_fraction": round(self.at_bound, 4)}


def percentile_interval(samples: Sequence[float] | np.ndarray, level: float, *, point: float | None = None,
                        lower: float | None = None, upper: float | None = None,
                        limit: float = AT_BOUND_LIMIT) -> Interval:
    """Percentile interval of bootstrap ``samples``; not identified when ``point`` or more than
    ``limit`` of the samples lie on ``lower``/``upper`` (to a relative 1e-6)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if not len(s):
        return Interval(math.nan, math.nan, level)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = (float(v) for v in np.percentile(s, [tail, 100.0 - tail]))
    for bound in (lower, upper):
        if bound is None:
            continue
        tol = 1e-6 * max(1.0, abs(bound))
        share = float(np.mean(np.abs(s - bound) <= tol))
        on_it = point is not None and abs(point - bound) <= tol
        if on_it or share > limit:
            return Interval(lo, hi, level, identified=False, at_bound=share, bound=float(bound))
    return Interval(lo, hi, level)


def resample(groups: Sequence[object] | np.ndarray, rng: np.random.Generator, by: str = "trials") -> np.ndarray:
    """Row indices of one bootstrap draw: whole groups (``by='trials'``) or single rows (``'points'``).

    With one group only, or ``by='points'``, rows are drawn one by one."""
    g = np.asarray(groups)
    if by not in ("trials", "points"):
        raise ValueError("by must be 'trials' or 'points'")
    uniq = np.unique(g)
    if by == "points" or len(uniq) < 2:
        return rng.integers(0, len(g), len(g))
    chosen = rng.choice(uniq, len(uniq))
    return np.concatenate([np.flatnonzero(g == u) for u in chosen])


def robust_z(residuals: Sequence[float] | np.ndarray) -> np.ndarray:
    """(r - median) / (1.4826 MAD): a z-score scaled by the data's own spread, not a fixed threshold."""
    r = np.asarray(residuals, dtype=float)
    if not len(r):
        return r
    med = float(np.median(r))
    mad = MAD_TO_SD * float(np.median(np.abs(r - med)))
    if mad <= 0:
        spread = float(np.std(r))
        return np.zeros_like(r) if spread == 0 else (r - med) / spread
    return (r - med) / mad


def mad_outliers(residuals: Sequence[float] | np.ndarray, z: float = OUTLIER_Z) -> np.ndarray:
    """Residuals whose robust z exceeds ``z`` in size."""
    return np.abs(robust_z(residuals)) > z


def cover(inner_lo: np.ndarray, inner_hi: np.ndarray, outer_lo: np.ndarray,
          outer_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An outer band (prediction) widened where needed to contain an inner one (confidence)."""
    return np.fmin(outer_lo, inner_lo), np.fmax(outer_hi, inner_hi)
