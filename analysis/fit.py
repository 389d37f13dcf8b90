"""Scaling-law fits with uncertainty, returned as explicit result objects.

``fit_fid_vs_gflops``   the paper's headline: FID against forward Gflops at one training step,
                        a power law in log-log space (log FID = a + b·log Gflops), Pearson r of
                        log Gflops with FID and with log FID, bootstrap CIs.
``fit_saturating``      FID against training compute across every evaluation:
                        FID = E + A·C^(−α), robust (Huber on log residuals), many starts,
                        bootstrap CIs on E, A and α, and predictions with a band.
``compute_frontier``    the compute-efficient frontier: the evaluations no cheaper one beats.

Logs are natural logs; the slope ``b`` and ``α`` do not depend on the base.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from analysis.schema import FID

COMPUTE = "compute_gflops"  # the frames' training-compute column (analysis.runs)


def _g(v: float) -> str:
    """4 significant digits; values that are zero to optimizer precision print as 0."""
    return "0" if abs(v) < 1e-8 else f"{v:.4g}"


def _ci_text(ci: tuple[float, float], fmt: str | None = None) -> str:
    f = fmt.format if fmt else _g
    return f"[{f(ci[0])}, {f(ci[1])}]"


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return (float(lo), float(hi))


def _label(df: pd.DataFrame) -> pd.Series:
    if "model" in df and "step" in df and df["model"].notna().all():
        dup = df["model"].duplicated(keep=False)
        return df["model"].astype(str).where(~dup, df["model"].astype(str) + "@" + df["step"].astype(str))
    if "trial" in df:
        return df["trial"].astype(str)
    return pd.Series([str(i) for i in df.index], index=df.index)


# ------------------------------------------------------------------------------------------
# Choosing the evaluations at one training step
# ------------------------------------------------------------------------------------------


def common_step(evals: pd.DataFrame, y: str = FID) -> int | None:
    """The step at which most trials have a value of ``y`` (the latest such step on ties)."""
    if y not in evals or not evals[y].notna().any():
        return None
    have = evals.dropna(subset=[y]).groupby("step")["trial"].nunique()
    best = have[have == have.max()]
    return int(best.index.max())


def at_step(evals: pd.DataFrame, step: int | None = None, y: str = FID) -> tuple[pd.DataFrame, int | None,
                                                                                 pd.DataFrame]:
    """Evaluations at ``step`` (default: ``common_step``), and trials left out with a reason."""
    step = common_step(evals, y) if step is None else int(step)
    if step is None:
        return evals.iloc[0:0].copy(), None, pd.DataFrame(columns=["label", "reason"])
    rows = evals[(evals["step"] == step) & evals[y].notna()]
    missing = sorted(set(evals["trial"]) - set(rows["trial"])) if "trial" in evals else []
    excluded = pd.DataFrame({"label": missing, "reason": [f"no {y} at step {step}"] * len(missing)})
    return rows.copy(), step, excluded


# ------------------------------------------------------------------------------------------
# FID vs Gflops: power law in log-log space
# ------------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """ln y = a + b·ln x, by least squares in log-log space, with bootstrap intervals."""

    x_name: str
    y_name: str
    step: int | None
    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    b_se: float
    r_y: float  # Pearson r(ln x, y)       -- the paper's "-0.93" variant for FID
    r_y_p: float
    r_log_y: float  # Pearson r(ln x, ln y)
    r_log_y_p: float
    r2: float
    used: pd.DataFrame  # label, x, y, fitted, residual (ln y − fitted ln y)
    excluded: pd.DataFrame  # label, reason
    level: float
    n_boot: int
    n_boot_ok: int
    seed: int
    boot: np.ndarray = field(repr=False)  # (n_boot_ok, 2): a, b per resample
    converged: bool = True  # closed form; kept for symmetry with SaturatingFit
    message: str = "closed-form least squares in log-log space"

    @property
    def n(self) -> int:
        return len(self.used)

    @property
    def prefactor(self) -> float:
        """y = prefactor · x^b."""
        return math.exp(self.a)

    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "prefactor": self.prefactor}

    def predict(self, x: float | Sequence[float], level: float | None = None) -> pd.DataFrame:
        """y at x with the bootstrap band of the fitted line (a confidence band, not of new points)."""
        x = np.atleast_1d(np.asarray(x, dtype=float))
        lx = np.log(x)
        mid = np.exp(self.a + self.b * lx)
        if len(self.boot):
            lines = self.boot[:, :1] + self.boot[:, 1:2] * lx[None, :]
            tail = (1.0 - (level or self.level)) / 2.0 * 100.0
            lo, hi = np.exp(np.percentile(lines, [tail, 100.0 - tail], axis=0))
        else:
            lo = hi = np.full_like(mid, np.nan)
        xmin, xmax = self.used["x"].min(), self.used["x"].max()
        return pd.DataFrame({self.x_name: x, self.y_name: mid, "lo": lo, "hi": hi,
                             "extrapolated": (x < xmin) | (x > xmax)})

    def summary(self) -> str:
        at = f" at step {self.step:,}" if self.step is not None else ""
        pct = f"{self.level:.0%}"
        lines = [
            (f"{self.y_name} vs {self.x_name}{at}: power law in log-log space "
            f"({self.n} points, {len(self.excluded)} excluded)"),
            (f"  ln {self.y_name} = {self.a:.4f} {'-' if self.b < 0 else '+'} {abs(self.b):.4f} ln {self.x_name}"
            f"   ({self.y_name} = {self.prefactor:.4g} * {self.x_name}^{self.b:.4f})"),
            f"  slope b = {self.b:.4f}  {pct} CI {_ci_text(self.b_ci, '{:.4f}')}  (bootstrap se {self.b_se:.4f})",
            f"  intercept a = {self.a:.4f}  {pct} CI {_ci_text(self.a_ci, '{:.4f}')}",
            f"  Pearson r(ln {self.x_name}, {self.y_name})    = {self.r_y:.4f}  (p = {self.r_y_p:.2g})",
            f"  Pearson r(ln {self.x_name}, ln {self.y_name}) = {self.r_log_y:.4f}  (p = {self.r_log_y_p:.2g})",
            f"  R^2 (log-log) = {self.r2:.4f}; residual sd (ln) = {self.used['residual'].std(ddof=2):.4f}"
            if self.n > 2 else f"  R^2 (log-log) = {self.r2:.4f}",
            f"  bootstrap: {self.n_boot_ok}/{self.n_boot} resamples of the points, seed {self.seed}",
        ]
        for label, reason in self.excluded.itertuples(index=False, name=None):
            lines.append(f"  excluded {label}: {reason}")
        return "\n".join(lines)


def fit_power_law(
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str] | None = None,
    *,
    x_name: str = "gflops",
    y_name: str = "fid",
    step: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    excluded: pd.DataFrame | None = None,
) -> PowerLawFit:
    """ln y = a + b ln x on positive finite pairs; bootstrap (seeded) over the points."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    labels = [str(v) for v in (labels if labels is not None else range(len(x)))]
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    bad = pd.DataFrame({"label": [lab for lab, g in zip(labels, ok) if not g],
                        "reason": [f"missing or non-positive {x_name}/{y_name}"] * int((~ok).sum())})
    excluded = pd.concat([excluded, bad], ignore_index=True) if excluded is not None and len(excluded) else bad
    x, y = x[ok], y[ok]
    labels = [lab for lab, g in zip(labels, ok) if g]
    if len(x) < 3 or np.ptp(np.log(x)) == 0:
        raise ValueError(f"a power-law fit needs at least 3 points with distinct {x_name} (got {len(x)})")
    lx, ly = np.log(x), np.log(y)
    b, a = np.polyfit(lx, ly, 1)
    fitted = a + b * lx
    resid = ly - fitted
    r2 = 1.0 - float(np.sum(resid**2) / np.sum((ly - ly.mean()) ** 2))
    r_y, p_y = stats.pearsonr(lx, y)
    r_ly, p_ly = stats.pearsonr(lx, ly)

    rng = np.random.default_rng(seed)
    n = len(x)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if np.ptp(lx[idx]) == 0:
            continue  # all draws at one x: no slope
        bb, ab = np.polyfit(lx[idx], ly[idx], 1)
        boot.append((ab, bb))
    boot_arr = np.asarray(boot, dtype=float).reshape(-1, 2)
    used = pd.DataFrame({"label": labels, "x": x, "y": y, "fitted": np.exp(fitted), "residual": resid})
    return PowerLawFit(
        x_name=x_name, y_name=y_name, step=step, a=float(a), b=float(b),
        a_ci=_percentile_ci(boot_arr[:, 0], level), b_ci=_percentile_ci(boot_arr[:, 1], level),
        b_se=float(np.std(boot_arr[:, 1], ddof=1)) if len(boot_arr) > 1 else math.nan,
        r_y=float(r_y), r_y_p=float(p_y), r_log_y=float(r_ly), r_log_y_p=float(p_ly), r2=r2,
        used=used, excluded=excluded.reset_index(drop=True), level=level, n_boot=n_boot,
        n_boot_ok=len(boot_arr), seed=seed, boot=boot_arr,
    )


def fit_fid_vs_gflops(
    evals: pd.DataFrame,
    step: int | None = None,
    *,
    y: str = FID,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PowerLawFit:
    """FID against forward Gflops at one training step (default: the step most trials reached).

    ``evals`` is a StudyData's ``evals`` frame (a published table's included).
    """
    rows, step, excluded = at_step(evals, step, y)
    if not len(rows):
        raise ValueError(f"no {y} values to fit" + (f" at step {step}" if step is not None else ""))
    rows = rows.sort_values("gflops")
    return fit_power_law(rows["gflops"], rows[y], _label(rows), x_name="gflops", y_name=y.split("/")[-1],
                         step=step, n_boot=n_boot, seed=seed, level=level, excluded=excluded)


# ------------------------------------------------------------------------------------------
# Compute-efficient frontier
# ------------------------------------------------------------------------------------------


def compute_frontier(evals: pd.DataFrame, x: str = COMPUTE, y: str = FID) -> pd.DataFrame:
    """The lower envelope of y over x across all models: the evaluations that no evaluation
    with less (or equal) compute beats. Sorted by x; the best y at budget C is the last
    frontier row with x <= C."""
    if y not in evals or x not in evals:
        return evals.iloc[0:0].copy()
    pts = evals.dropna(subset=[x, y])
    pts = pts[np.isfinite(pts[x].astype(float)) & np.isfinite(pts[y].astype(float))]
    pts = pts.sort_values([x, y], kind="mergesort")
    best = np.inf
    keep = []
    for value in pts[y].to_numpy(dtype=float):
        keep.append(value < best)
        best = min(best, value)
    return pts[np.asarray(keep, dtype=bool)].reset_index(drop=True)


def frontier_at(frontier: pd.DataFrame, budget: float | Sequence[float], x: str = COMPUTE,
                y: str = FID) -> np.ndarray:
    """Best observed y with at most ``budget`` compute (nan below the cheapest evaluation)."""
    budget = np.atleast_1d(np.asarray(budget, dtype=float))
    xs, ys = frontier[x].to_numpy(float), frontier[y].to_numpy(float)
    idx = np.searchsorted(xs, budget, side="right") - 1
    return np.where(idx >= 0, ys[np.clip(idx, 0, None)] if len(ys) else np.nan, np.nan)


# ------------------------------------------------------------------------------------------
# FID vs training compute: saturating power law, Huber on log residuals
# ------------------------------------------------------------------------------------------

PARAM_NAMES = ("E", "A", "alpha")


@dataclass
class SaturatingFit:
    """FID = E + A·C^(−α) (C in training Gflops), fitted robustly on log residuals.

    Internally C is scaled by C0 (the geometric mean of the data's compute):
    FID = E + A0·(C/C0)^(−α), A = A0·C0^α; ``A`` is reported in the data's units.
    """

    E: float
    A: float
    alpha: float
    A0: float
    C0: float
    ci: dict[str, tuple[float, float]]
    level: float
    loss: str
    f_scale: float
    cost: float
    converged: bool
    message: str
    nfev: int
    n_starts: int
    n_starts_ok: int  # starts that converged
    n_starts_agree: int  # converged starts within 1e-6 (relative) of the best cost
    at_bounds: list[str]  # parameters the best fit pinned to a bound (e.g. E = 0: no saturation seen)
    used: pd.DataFrame  # label, compute, fid, fitted, residual (ln), outlier
    excluded: pd.DataFrame  # label, reason
    n_boot: int
    n_boot_ok: int
    seed: int
    bootstrap: str  # "points" or "trials"
    boot: np.ndarray = field(repr=False)  # (n_boot_ok, 3): E, ln A0, alpha
    x_name: str = COMPUTE
    y_name: str = "fid"

    @property
    def n(self) -> int:
        return len(self.used)

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    def _curve(self, theta: np.ndarray, c: np.ndarray) -> np.ndarray:
        return theta[..., 0:1] + np.exp(theta[..., 1:2]) * (c / self.C0) ** (-theta[..., 2:3])

    def predict(self, compute: float | Sequence[float], kind: str = "confidence",
                level: float | None = None) -> pd.DataFrame:
        """FID at ``compute`` with a bootstrap band.

        ``kind='confidence'`` is the band of the fitted curve; ``'prediction'`` adds the
        scatter of a new evaluation (a resampled log residual per bootstrap draw).
        ``extrapolated`` marks budgets beyond the fitted compute range.
        """
        if kind not in ("confidence", "prediction"):
            raise ValueError("kind must be 'confidence' or 'prediction'")
        c = np.atleast_1d(np.asarray(compute, dtype=float))
        theta = np.array([self.E, math.log(self.A0), self.alpha])
        mid = self._curve(theta[None, :], c[None, :])[0]
        lo = hi = np.full_like(mid, np.nan)
        if len(self.boot):
            curves = self._curve(self.boot, c[None, :])
            if kind == "prediction":
                rng = np.random.default_rng(self.seed + 1)
                res = self.used["residual"].to_numpy(float)
                curves = curves * np.exp(rng.choice(res, size=curves.shape))
            tail = (1.0 - (level or self.level)) / 2.0 * 100.0
            lo, hi = np.percentile(curves, [tail, 100.0 - tail], axis=0)
        cmin, cmax = self.used["compute"].min(), self.used["compute"].max()
        return pd.DataFrame({self.x_name: c, self.y_name: mid, "lo": lo, "hi": hi,
                             "extrapolated": (c < cmin) | (c > cmax)})

    @property
    def outliers(self) -> list[str]:
        return list(self.used.loc[self.used["outlier"], "label"])

    def summary(self) -> str:
        pct = f"{self.level:.0%}"
        state = "converged" if self.converged else "NOT converged"
        lines = [
            (f"{self.y_name} vs training compute: {self.y_name} = E + A * C^(-alpha)  "
            f"({self.n} points, {len(self.excluded)} excluded; C in Gflops)"),
            f"  E     = {_g(self.E)}  {pct} CI {_ci_text(self.ci['E'])}   (irreducible {self.y_name})",
            (f"  A     = {self.A:.4g}  {pct} CI {_ci_text(self.ci['A'])}   "
            f"(= {self.A0:.4g} * C0^alpha, C0 = {self.C0:.4g})"),
            f"  alpha = {self.alpha:.4f}  {pct} CI {_ci_text(self.ci['alpha'], '{:.4f}')}",
            (f"  robust fit: {self.loss} loss on ln residuals, f_scale {self.f_scale:g}; {state} "
            f"({self.message}); cost {self.cost:.4g}, {self.nfev} evaluations"),
            f"  starts: {self.n_starts_ok}/{self.n_starts} converged, {self.n_starts_agree} reach the best cost",
            *([f"  at a bound: {', '.join(self.at_bounds)} (E = 0 means the data show no saturation yet)"]
              if self.at_bounds else []),
            (f"  residual sd (ln) = {self.used['residual'].std(ddof=min(3, self.n - 1)):.4f}; "
            f"outliers (|res| > 3 f_scale): {', '.join(self.outliers) or 'none'}"),
            f"  bootstrap: {self.n_boot_ok}/{self.n_boot} resamples of the {self.bootstrap}, seed {self.seed}",
        ]
        for label, reason in self.excluded.itertuples(index=False, name=None):
            lines.append(f"  excluded {label}: {reason}")
        return "\n".join(lines)


def _residuals(theta: np.ndarray, z: np.ndarray, ly: np.ndarray) -> np.ndarray:
    pred = theta[0] + np.exp(theta[1]) * z ** (-theta[2])
    return ly - np.log(np.maximum(pred, 1e-300))


def _jacobian(theta: np.ndarray, z: np.ndarray, ly: np.ndarray) -> np.ndarray:
    power = np.exp(theta[1]) * z ** (-theta[2])
    pred = np.maximum(theta[0] + power, 1e-300)
    return np.column_stack([-1.0 / pred, -power / pred, power * np.log(z) / pred])


def _solve(theta0, z, ly, bounds, loss, f_scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return optimize.least_squares(_residuals, theta0, jac=_jacobian, args=(z, ly), bounds=bounds, loss=loss,
                                      f_scale=f_scale, method="trf", x_scale="jac", max_nfev=2000)


def _starts(z: np.ndarray, y: np.ndarray, alphas, e_fracs, lo, hi) -> list[np.ndarray]:
    out = []
    for alpha in alphas:
        for frac in e_fracs:
            e = frac * float(y.min())
            gap = y - e
            ok = gap > 0
            la = float(np.median(np.log(gap[ok]) + alpha * np.log(z[ok]))) if ok.any() else 0.0
            out.append(np.clip([e, la, alpha], lo + 1e-9, hi - 1e-9))
    return out


def _saturating_points(evals: pd.DataFrame, x: str, y: str):
    """The usable evaluations: labels, compute, FID, trial of each, and the excluded ones."""
    df = evals.copy()
    labels = _label(df) if len(df) else pd.Series(dtype=str)
    cx, cy = pd.to_numeric(df[x], errors="coerce"), pd.to_numeric(df[y], errors="coerce")
    ok = (cx > 0) & (cy > 0) & np.isfinite(cx) & np.isfinite(cy)
    excluded = pd.DataFrame({"label": labels[~ok].tolist(),
                             "reason": [f"missing or non-positive {x}/{y}"] * int((~ok).sum())})
    df, labels = df[ok], labels[ok]
    c, fid = cx[ok].to_numpy(float), cy[ok].to_numpy(float)
    if len(c) < 6 or np.unique(c).size < 4:
        raise ValueError("a saturating fit (3 parameters) needs at least 6 evaluations at 4 or more distinct "
                         f"compute budgets (got {len(c)} at {np.unique(c).size})")
    groups = df["trial"].astype(str).to_numpy() if "trial" in df else np.arange(len(c)).astype(str)
    return labels, c, fid, groups, excluded


def _bootstrap_saturating(theta, z, ly, groups, bounds, loss, f_scale, n_boot: int, bootstrap: str,
                          seed: int) -> np.ndarray:
    """Refits on ``n_boot`` resamples (of points, or of whole trials), each started at ``theta``."""
    rng = np.random.default_rng(seed)
    boot = []
    uniq = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    for _ in range(n_boot):
        if bootstrap == "trials" and len(uniq) > 1:
            idx = np.concatenate([members[g] for g in rng.choice(uniq, len(uniq))])
        else:
            idx = rng.integers(0, len(z), len(z))
        if np.unique(z[idx]).size < 3:
            continue
        r = _solve(theta, z[idx], ly[idx], bounds, loss, f_scale)
        if r.status > 0:
            boot.append(r.x)
    return np.asarray(boot, dtype=float).reshape(-1, 3)


def fit_saturating(
    evals: pd.DataFrame,
    *,
    x: str = COMPUTE,
    y: str = FID,
    loss: str = "huber",
    f_scale: float = 0.05,
    alphas: Sequence[float] = (0.03, 0.08, 0.15, 0.25, 0.4, 0.6, 0.9, 1.4),
    e_fractions: Sequence[float] = (0.0, 0.3, 0.6, 0.85, 0.97),
    n_boot: int = 1000,
    bootstrap: str = "points",
    seed: int = 0,
    level: float = 0.95,
) -> SaturatingFit:
    """FID = E + A·C^(−α) over every evaluation (rows of ``evals``).

    Robust regression: ``least_squares(loss='huber')`` on ln FID − ln(model), ``f_scale``
    the Huber threshold in log units (0.05 ≈ 5%). Multi-start over a grid of α and E (as a
    fraction of the lowest FID); the best cost wins. Bootstrap: refit on resamples of the
    points (``bootstrap='points'``) or of whole trials (``'trials'``, keeps each curve
    together), each started from the best fit.
    """
    if bootstrap not in ("points", "trials"):
        raise ValueError("bootstrap must be 'points' or 'trials'")
    if y not in evals:
        raise ValueError(f"no {y} values to fit")
    labels, c, fid, groups, excluded = _saturating_points(evals, x, y)
    C0 = float(np.exp(np.mean(np.log(c))))
    z, ly = c / C0, np.log(fid)
    lo = np.array([0.0, -60.0, 1e-4])
    hi = np.array([float(fid.max()), 60.0, 4.0])
    bounds = (lo, hi)

    results = [_solve(t, z, ly, bounds, loss, f_scale) for t in _starts(z, fid, alphas, e_fractions, lo, hi)]
    good = [r for r in results if r.status > 0]
    best = min(good or results, key=lambda r: r.cost)
    n_agree = sum(1 for r in good if r.cost <= best.cost * (1 + 1e-6) + 1e-12)
    boot_arr = _bootstrap_saturating(best.x, z, ly, groups, bounds, loss, f_scale, n_boot, bootstrap, seed)

    E, la, alpha = (float(v) for v in best.x)
    resid = _residuals(best.x, z, ly)
    a_samples = np.exp(boot_arr[:, 1]) * C0 ** boot_arr[:, 2]
    ci = {"E": _percentile_ci(boot_arr[:, 0], level),
          "A": _percentile_ci(a_samples, level),
          "alpha": _percentile_ci(boot_arr[:, 2], level)}
    used = pd.DataFrame({"label": labels.to_numpy(), "compute": c, "fid": fid,
                         "fitted": np.exp(ly - resid), "residual": resid,
                         "outlier": np.abs(resid) > 3 * f_scale})
    return SaturatingFit(
        E=E, A=float(math.exp(la) * C0**alpha), alpha=alpha, A0=float(math.exp(la)), C0=C0, ci=ci,
        level=level, loss=loss, f_scale=f_scale, cost=float(best.cost), converged=bool(best.status > 0),
        message=str(best.message), nfev=int(best.nfev), n_starts=len(results), n_starts_ok=len(good),
        n_starts_agree=n_agree, at_bounds=[name for name, m in zip(("E", "A", "alpha"), best.active_mask) if m],
        used=used, excluded=excluded, n_boot=n_boot, n_boot_ok=len(boot_arr),
        seed=seed, bootstrap=bootstrap, boot=boot_arr, x_name=x, y_name=y.split("/")[-1],
    )
