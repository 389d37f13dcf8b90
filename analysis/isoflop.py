"""IsoFLOP profiles (Chinchilla's approach 2): the compute-optimal model size without a surface.

At a training budget C (Gflops, C = 3·N·D), every curve that passes through C says what FID its
model reached with that compute: read it off the curve at D = C / (3N), interpolating linearly
in ln D vs ln FID between the curve's own evaluations (never beyond them: a curve says nothing
past its last evaluation). A parabola in ln N through those FIDs has its minimum at N*(C); a
power law ln N* = k·ln C + c through the minima gives the exponent k, which should agree with
``analysis.envelope``'s b/(a+b) when both describe the data.

Why budgets are skipped rather than forced: a parabola that opens downward has no minimum, and a
minimum outside the sizes that reach the budget is an extrapolation of a quadratic; either
would put a made-up point into the power law. Each skip is recorded with its reason.

The interval on k comes from resampling whole curves, as in the envelope fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.envelope import envelope_rows
from analysis.uncertainty import Interval, percentile_interval, resample

MIN_CURVES = 3  # a parabola needs three distinct sizes
N_BUDGETS = 12


def _curves(used: pd.DataFrame, group: str) -> tuple[list[str], np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Per curve: its name, N (median gflops) and its (ln D, ln FID) sorted by D, repeats averaged."""
    names, sizes, tracks = [], [], []
    for name, g in used.groupby(group, sort=True):
        ln = pd.DataFrame({"ld": np.log(g["images_seen"].to_numpy(float)), "lf": np.log(g["fid"].to_numpy(float))})
        ln = ln.groupby("ld", sort=True)["lf"].mean()
        names.append(str(name))
        sizes.append(float(g["gflops"].median()))
        tracks.append((ln.index.to_numpy(float), ln.to_numpy(float)))
    return names, np.asarray(sizes), tracks


def _at_budgets(sizes: np.ndarray, tracks: list, budgets: np.ndarray) -> np.ndarray:
    """ln FID of each curve at each budget (curves × budgets), nan where the curve does not reach."""
    out = np.full((len(sizes), len(budgets)), np.nan)
    for i, (n, (ld, lf)) in enumerate(zip(sizes, tracks)):
        target = np.log(budgets / (3.0 * n))
        inside = (target >= ld[0] - 1e-12) & (target <= ld[-1] + 1e-12)
        out[i, inside] = np.interp(target[inside], ld, lf)
    return out


def _default_budgets(sizes: np.ndarray, tracks: list, count: int = N_BUDGETS) -> np.ndarray:
    """A log grid over the budgets that at least three curves with distinct N reach."""
    lo = np.array([math.log(3.0 * n) + ld[0] for n, (ld, _) in zip(sizes, tracks)])
    hi = np.array([math.log(3.0 * n) + ld[-1] for n, (ld, _) in zip(sizes, tracks)])
    grid = np.linspace(lo.min(), hi.max(), 400)
    reach = [np.unique(sizes[(lo <= x + 1e-12) & (hi >= x - 1e-12)]).size for x in grid]
    ok = grid[np.asarray(reach) >= MIN_CURVES]
    if not len(ok):
        raise ValueError(f"no training budget is reached by {MIN_CURVES} curves with distinct gflops: "
                         "isoFLOP profiles need curves that overlap in compute")
    return np.exp(np.linspace(ok.min(), ok.max(), count))


def _minimum(ln_n: np.ndarray, ln_f: np.ndarray) -> tuple[float, float] | str:
    """(ln N*, ln FID*) of the parabola in ln N through the points, or why there is none."""
    keep = np.isfinite(ln_f)
    x, y = ln_n[keep], ln_f[keep]
    if np.unique(x).size < MIN_CURVES:
        return f"{np.unique(x).size} curve(s) with distinct gflops reach it (need {MIN_CURVES})"
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        return "the parabola in ln gflops opens downward (no minimum)"
    xs = -p1 / (2.0 * p2)
    if xs < x.min() or xs > x.max():
        return (f"the parabola's minimum (gflops {math.exp(xs):.4g}) lies outside the sizes that reach it "
                f"[{math.exp(x.min()):.4g}, {math.exp(x.max()):.4g}]")
    return float(xs), float(p0 + p1 * xs + p2 * xs * xs)


def _minima(ln_n: np.ndarray, table: np.ndarray, budgets: np.ndarray) -> tuple[list, list]:
    found, skipped = [], []
    for j, c in enumerate(budgets):
        m = _minimum(ln_n, table[:, j])
        if isinstance(m, str):
            skipped.append((float(c), m))
        else:
            found.append((float(c), math.exp(m[0]), math.exp(m[1])))
    return found, skipped


def _slope(found: list) -> tuple[float, float]:
    """(k, c) of ln N* = k ln C + c."""
    lc = np.log([f[0] for f in found])
    ln = np.log([f[1] for f in found])
    k, c = np.polyfit(lc, ln, 1)
    return float(k), float(c)


@dataclass
class IsoflopResult:
    """IsoFLOP profiles, their minima and the power law N* ∝ C^k through them."""

    profiles: pd.DataFrame  # budget, model, gflops, images_seen, fid (one row per curve reaching a budget)
    minima: pd.DataFrame  # compute_gflops, n_opt, fid_opt
    exponent: float
    intercept: float  # ln N* = exponent · ln C + intercept
    exponent_interval: Interval
    skipped: pd.DataFrame  # budget, reason
    excluded: pd.DataFrame  # label, reason (rows that were not usable)
    level: float
    n_boot: int
    seed: int
    boot: np.ndarray = field(repr=False)  # the exponent of each bootstrap draw that had 2+ minima

    @property
    def exponent_ci(self) -> tuple[float, float]:
        return self.exponent_interval.pair()

    def n_opt(self, compute: float | Sequence[float]) -> np.ndarray:
        """N* of the power law at each budget."""
        return np.exp(self.intercept) * np.atleast_1d(np.asarray(compute, dtype=float)) ** self.exponent

    def summary(self) -> str:
        """The exponent with its interval, each budget's minimum, and the budgets skipped."""
        lines = [
            (f"isoFLOP profiles: {len(self.minima)} budget(s) with a minimum, {len(self.skipped)} skipped; "
             f"N* ~ C^{self.exponent:.4f}  {self.level:.0%} {self.exponent_interval.text('{:.4f}')}  "
             f"(N = forward Gflops per image, C = 3 N D Gflops)"),
            f"  bootstrap: {len(self.boot)}/{self.n_boot} resamples of the whole curves, seed {self.seed}",
        ]
        lines += [f"  C = {c:.4g}: N* = {n:.4g}, fid {f:.4g}" for c, n, f in self.minima.itertuples(index=False)]
        lines += [f"  skipped C = {c:.4g}: {why}" for c, why in self.skipped.itertuples(index=False)]
        lines += [f"  excluded {lab}: {why}" for lab, why in self.excluded.itertuples(index=False, name=None)]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Plain Python values: exponent, exponent_ci ([lo, hi] or null), intercept, the minima and skips."""
        lo, hi = self.exponent_ci
        return {
            "exponent": float(self.exponent), "exponent_ci": ([float(lo), float(hi)]
                                                             if math.isfinite(lo) and math.isfinite(hi) else None),
            "intercept": float(self.intercept), "level": float(self.level), "n_boot": int(self.n_boot),
            "n_boot_ok": len(self.boot), "seed": int(self.seed),
            "minima": [{"compute_gflops": float(c), "n_opt": float(n), "fid_opt": float(f)}
                       for c, n, f in self.minima.itertuples(index=False)],
            "skipped": [{"budget": float(c), "reason": str(w)} for c, w in self.skipped.itertuples(index=False)],
            "excluded": [{"label": str(lab), "reason": str(w)}
                         for lab, w in self.excluded.itertuples(index=False, name=None)],
        }


def _profiles(names: list[str], sizes: np.ndarray, table: np.ndarray, budgets: np.ndarray) -> pd.DataFrame:
    i, j = np.nonzero(np.isfinite(table))
    return pd.DataFrame({"budget": budgets[j], "model": [names[k] for k in i], "gflops": sizes[i],
                         "images_seen": budgets[j] / (3.0 * sizes[i]), "fid": np.exp(table[i, j])}
                        ).sort_values(["budget", "gflops"], kind="mergesort").reset_index(drop=True)


def _bootstrap(ln_n: np.ndarray, table: np.ndarray, budgets: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The exponent refitted on resamples of whole curves (draws with fewer than 2 minima drop out)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = resample(np.arange(len(ln_n)), rng, by="trials")
        found, _ = _minima(ln_n[idx], table[idx], budgets)
        if len(found) >= 2:
            out.append(_slope(found)[0])
    return np.asarray(out, dtype=float)


def isoflop_profiles(
    df: pd.DataFrame,
    budgets: Sequence[float] | None = None,
    group: str = "model",
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> IsoflopResult:
    """IsoFLOP profiles of an envelope table (``group``, gflops, images_seen, fid) or a study's evals.

    ``budgets`` (training Gflops) default to a log grid over where at least 3 curves with distinct
    N overlap. Per budget, a parabola in ln N through ln FID; its minimum N*; then
    ln N* = k ln C + c with a percentile interval on k from ``n_boot`` resamples of the curves.
    Raises ``ValueError`` when fewer than two budgets have a minimum."""
    used, excluded = envelope_rows(df, group)
    names, sizes, tracks = _curves(used, group)
    if np.unique(sizes).size < MIN_CURVES:
        raise ValueError(f"isoFLOP profiles need at least {MIN_CURVES} curves with distinct gflops "
                         f"(got {np.unique(sizes).size})")
    grid = (np.asarray(budgets, dtype=float) if budgets is not None else _default_budgets(sizes, tracks))
    table = _at_budgets(sizes, tracks, grid)
    ln_n = np.log(sizes)
    found, skipped = _minima(ln_n, table, grid)
    if len(found) < 2:
        why = "; ".join(f"C = {c:.4g}: {w}" for c, w in skipped[:4])
        raise ValueError(f"isoFLOP profiles need a minimum at 2 or more budgets (found {len(found)}; {why})")
    k, c = _slope(found)
    boot = _bootstrap(ln_n, table, grid, n_boot, seed)
    return IsoflopResult(
        profiles=_profiles(names, sizes, table, grid),
        minima=pd.DataFrame(found, columns=["compute_gflops", "n_opt", "fid_opt"]),
        exponent=k, intercept=c, exponent_interval=percentile_interval(boot, level),
        skipped=pd.DataFrame(skipped, columns=["budget", "reason"]), excluded=excluded,
        level=level, n_boot=n_boot, seed=seed, boot=boot,
    )
