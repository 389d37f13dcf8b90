"""Scaling-law fits with uncertainty, returned as explicit result objects.

``fit_fid_vs_gflops``  the paper's headline: FID against forward Gflops at one training step, a
                       power law in log-log space (ln FID = a + b·ln Gflops), Pearson r of ln
                       Gflops with FID and with ln FID, bootstrap CIs.
``fit_saturating``     FID = E + A·C^(−α) against training compute, on the compute frontier
                       (default) or every evaluation; Huber on ln residuals, many starts.
``compute_frontier``   the compute-efficient frontier: the evaluations no cheaper one beats.

Uncertainty follows ``analysis.uncertainty``: whole trials are resampled (a curve's points are
correlated), a parameter on its bound is "not identified", prediction bands contain confidence
bands, outliers are ln residuals with robust (MAD-scaled) |z| > 3.5.

``to_json()`` keys (plain numbers, ``null`` where undefined, intervals ``[lo, hi]``):
PowerLawFit: n, x, y, step, pearson_logx_y, pearson_logx_logy, slope, slope_ci, intercept,
intercept_ci, r2, residual_sd, level, bootstrap, n_boot_ok, excluded ([{label, reason}]),
outliers ([label]). SaturatingFit: E, A, alpha (each {value, interval, level, identified,
at_bound_fraction}), n, n_evals, on, bootstrap, level, converged, at_bounds, n_boot_ok,
outliers, excluded. Logs are natural; the exponents do not depend on the base.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import optimize, stats

from analysis.schema import FID
from analysis.uncertainty import MAD_TO_SD, Interval, cover, mad_outliers, percentile_interval, resample

COMPUTE = "compute_gflops"  # the frames' training-compute column (analysis.runs)
# A 3-parameter law needs spare points: at least this many, at this many distinct budgets.
MIN_SATURATING_POINTS, MIN_SATURATING_BUDGETS = 5, 4
HUBER_K = 1.345  # Huber's threshold in robust sds: 95 % efficiency under normal noise


def _g(v: float) -> str:
    """4 significant digits; values that are zero to optimizer precision print as 0."""
    return "0" if abs(v) < 1e-8 else f"{v:.4g}"


def _ci_text(ci: tuple[float, float], fmt: str | None = None) -> str:
    f = fmt.format if fmt else _g
    return f"[{f(ci[0])}, {f(ci[1])}]"


def _num(v: float) -> float | None:
    """A plain float for JSON, ``None`` for nan/inf (json.dumps would write invalid NaN)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _pair(ci: tuple[float, float]) -> list[float | None]:
    return [_num(ci[0]), _num(ci[1])]


def _excluded_json(excluded: pd.DataFrame) -> list[dict[str, str]]:
    return [{"label": str(lab), "reason": str(why)} for lab, why in excluded.itertuples(index=False, name=None)]


def _label(df: pd.DataFrame) -> pd.Series:
    if "model" in df and "step" in df and df["model"].notna().all():
        dup = df["model"].duplicated(keep=False)
        return df["model"].astype(str).where(~dup, df["model"].astype(str) + "@" + df["step"].astype(str))
    if "trial" in df:
        return df["trial"].astype(str)
    return pd.Series([str(i) for i in df.index], index=df.index)


# --- Choosing the evaluations at one training step ---------------------------------------


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


# --- FID vs Gflops: power law in log-log space -------------------------------------------


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
    used: pd.DataFrame  # label, group, x, y, fitted, residual (ln y − fitted ln y), outlier
    excluded: pd.DataFrame  # label, reason
    level: float
    n_boot: int
    n_boot_ok: int
    seed: int
    boot: np.ndarray = field(repr=False)  # (n_boot_ok, 2): a, b per resample
    bootstrap: str = "points"  # what the resamples drew: "trials" (whole groups) or "points"
    converged: bool = True  # closed form; kept for symmetry with SaturatingFit
    message: str = "closed-form least squares in log-log space"

    @property
    def n(self) -> int:
        return len(self.used)

    @property
    def prefactor(self) -> float:
        """y = prefactor · x^b."""
        return math.exp(self.a)

    @property
    def b_interval(self) -> Interval:
        return percentile_interval(self.boot[:, 1], self.level)

    @property
    def outliers(self) -> list[str]:
        return list(self.used.loc[self.used["outlier"], "label"])

    @property
    def residual_sd(self) -> float:
        return float(np.sqrt(np.sum(self.used["residual"] ** 2) / (self.n - 2))) if self.n > 2 else math.nan

    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "prefactor": self.prefactor}

    def _t_halfwidths(self, lx: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Classic OLS half-widths in ln y at ln x: of the line, and of a new point (t with n−2 dof)."""
        ux = np.log(self.used["x"].to_numpy(float))
        t = float(stats.t.ppf(0.5 + level / 2.0, self.n - 2))
        leverage = 1.0 / self.n + (lx - ux.mean()) ** 2 / float(np.sum((ux - ux.mean()) ** 2))
        return t * self.residual_sd * np.sqrt(leverage), t * self.residual_sd * np.sqrt(1.0 + leverage)

    def predict(self, x: float | Sequence[float], kind: str = "confidence", level: float | None = None) -> pd.DataFrame:
        """y at x with a band: ``'confidence'`` for the fitted line (bootstrap percentiles, or the
        t band without resamples), ``'prediction'`` for a new point (the OLS prediction interval,
        widened where needed to contain the confidence band)."""
        if kind not in ("confidence", "prediction"):
            raise ValueError("kind must be 'confidence' or 'prediction'")
        level = level or self.level
        x = np.atleast_1d(np.asarray(x, dtype=float))
        lx = np.log(x)
        mid = self.a + self.b * lx
        conf, new = self._t_halfwidths(lx, level)
        if len(self.boot):
            lines = self.boot[:, :1] + self.boot[:, 1:2] * lx[None, :]
            tail = (1.0 - level) / 2.0 * 100.0
            lo, hi = np.percentile(lines, [tail, 100.0 - tail], axis=0)
        else:
            lo, hi = mid - conf, mid + conf
        if kind == "prediction":
            lo, hi = cover(lo, hi, mid - new, mid + new)
        xmin, xmax = self.used["x"].min(), self.used["x"].max()
        return pd.DataFrame({self.x_name: x, self.y_name: np.exp(mid), "lo": np.exp(lo), "hi": np.exp(hi),
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
            f"  R^2 (log-log) = {self.r2:.4f}; residual sd (ln) = {self.residual_sd:.4f}",
            f"  outliers (robust |z| > 3.5 on ln residuals): {', '.join(self.outliers) or 'none'}",
            f"  bootstrap: {self.n_boot_ok}/{self.n_boot} resamples of the {self.bootstrap}, seed {self.seed}",
        ]
        for label, reason in self.excluded.itertuples(index=False, name=None):
            lines.append(f"  excluded {label}: {reason}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        """The fit as plain JSON values (keys in the module docstring)."""
        return {"n": int(self.n), "x": self.x_name, "y": self.y_name,
                "step": None if self.step is None else int(self.step),
                "pearson_logx_y": _num(self.r_y), "pearson_logx_logy": _num(self.r_log_y),
                "slope": _num(self.b), "slope_ci": _pair(self.b_ci), "intercept": _num(self.a),
                "intercept_ci": _pair(self.a_ci), "r2": _num(self.r2), "residual_sd": _num(self.residual_sd),
                "level": float(self.level), "bootstrap": self.bootstrap, "n_boot_ok": int(self.n_boot_ok),
                "excluded": _excluded_json(self.excluded), "outliers": [str(v) for v in self.outliers]}


def _line_boot(lx: np.ndarray, ly: np.ndarray, groups: np.ndarray, n_boot: int, by: str,
               seed: int) -> np.ndarray:
    """(a, b) refitted on ``n_boot`` seeded resamples of whole groups or of points."""
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = resample(groups, rng, by=by)
        if np.ptp(lx[idx]) == 0:
            continue  # all draws at one x: no slope
        bb, ab = np.polyfit(lx[idx], ly[idx], 1)
        boot.append((ab, bb))
    return np.asarray(boot, dtype=float).reshape(-1, 2)


def fit_power_law(x: Sequence[float], y: Sequence[float], labels: Sequence[str] | None = None, *,
                  groups: Sequence[object] | None = None, bootstrap: str = "trials", x_name: str = "gflops",
                  y_name: str = "fid", step: int | None = None, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95, excluded: pd.DataFrame | None = None) -> PowerLawFit:
    """ln y = a + b ln x on positive finite pairs, with a seeded bootstrap.

    ``groups`` names each point's trial (curve). With ``bootstrap='trials'`` (default) and groups
    that repeat, whole groups are resampled, since points of one curve share their errors;
    otherwise (no groups, one point per group, or ``'points'``) points are resampled one by one.
    """
    if bootstrap not in ("trials", "points"):
        raise ValueError("bootstrap must be 'trials' or 'points'")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = [str(v) for v in (labels if labels is not None else range(len(x)))]
    g = np.asarray([str(v) for v in groups]) if groups is not None else np.asarray(labels)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    bad = pd.DataFrame({"label": [lab for lab, good in zip(labels, ok) if not good],
                        "reason": [f"missing or non-positive {x_name}/{y_name}"] * int((~ok).sum())})
    excluded = pd.concat([excluded, bad], ignore_index=True) if excluded is not None and len(excluded) else bad
    x, y, g = x[ok], y[ok], g[ok]
    labels = [lab for lab, good in zip(labels, ok) if good]
    if len(x) < 3 or np.ptp(np.log(x)) == 0:
        raise ValueError(f"a power-law fit needs at least 3 points with distinct {x_name} (got {len(x)})")
    lx, ly = np.log(x), np.log(y)
    b, a = np.polyfit(lx, ly, 1)
    resid = ly - (a + b * lx)
    r2 = 1.0 - float(np.sum(resid**2) / np.sum((ly - ly.mean()) ** 2))
    r_y, p_y = stats.pearsonr(lx, y)
    r_ly, p_ly = stats.pearsonr(lx, ly)
    by = "trials" if bootstrap == "trials" and len(np.unique(g)) < len(g) else "points"
    boot = _line_boot(lx, ly, g, n_boot, by, seed)
    used = pd.DataFrame({"label": labels, "group": g, "x": x, "y": y, "fitted": np.exp(ly - resid),
                         "residual": resid, "outlier": mad_outliers(resid)})
    return PowerLawFit(
        x_name=x_name, y_name=y_name, step=step, a=float(a), b=float(b),
        a_ci=percentile_interval(boot[:, 0], level).pair(), b_ci=percentile_interval(boot[:, 1], level).pair(),
        b_se=float(np.std(boot[:, 1], ddof=1)) if len(boot) > 1 else math.nan,
        r_y=float(r_y), r_y_p=float(p_y), r_log_y=float(r_ly), r_log_y_p=float(p_ly), r2=r2,
        used=used, excluded=excluded.reset_index(drop=True), level=level, n_boot=n_boot,
        n_boot_ok=len(boot), seed=seed, boot=boot, bootstrap=by,
    )


def fit_fid_vs_gflops(evals: pd.DataFrame, step: int | None = None, *, y: str = FID, n_boot: int = 2000,
                      bootstrap: str = "trials", seed: int = 0, level: float = 0.95) -> PowerLawFit:
    """FID against forward Gflops at one training step (default: the step most trials reached).

    ``evals`` is a StudyData's ``evals`` frame (a published table's included). One row per
    trial at the step, so a trial bootstrap only differs from a point one for repeated trials.
    """
    rows, step, excluded = at_step(evals, step, y)
    if not len(rows):
        raise ValueError(f"no {y} values to fit" + (f" at step {step}" if step is not None else ""))
    rows = rows.sort_values("gflops")
    groups = rows["trial"] if "trial" in rows else None
    return fit_power_law(rows["gflops"], rows[y], _label(rows), groups=groups, bootstrap=bootstrap,
                         x_name="gflops", y_name=y.split("/")[-1], step=step, n_boot=n_boot, seed=seed,
                         level=level, excluded=excluded)


# --- Compute-efficient frontier ----------------------------------------------------------


def _frontier_mask(c: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which of the points (c, y) no point with less or equal c beats (ties: the first stays)."""
    order = np.lexsort((y, c))  # stable: by c, then y
    ys = y[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(ys)[:-1]])
    keep = np.zeros(len(c), dtype=bool)
    keep[order] = ys < best_before
    return keep


def compute_frontier(evals: pd.DataFrame, x: str = COMPUTE, y: str = FID) -> pd.DataFrame:
    """The lower envelope of y over x across all models: the evaluations that no evaluation
    with less (or equal) compute beats. Sorted by x; the best y at budget C is the last
    frontier row with x <= C."""
    if y not in evals or x not in evals:
        return evals.iloc[0:0].copy()
    pts = evals.dropna(subset=[x, y])
    pts = pts[np.isfinite(pts[x].astype(float)) & np.isfinite(pts[y].astype(float))]
    pts = pts.sort_values([x, y], kind="mergesort")
    keep = _frontier_mask(pts[x].to_numpy(float), pts[y].to_numpy(float))
    return pts[keep].reset_index(drop=True)


def frontier_at(frontier: pd.DataFrame, budget: float | Sequence[float], x: str = COMPUTE,
                y: str = FID) -> np.ndarray:
    """Best observed y with at most ``budget`` compute (nan below the cheapest evaluation)."""
    budget = np.atleast_1d(np.asarray(budget, dtype=float))
    xs, ys = frontier[x].to_numpy(float), frontier[y].to_numpy(float)
    idx = np.searchsorted(xs, budget, side="right") - 1
    return np.where(idx >= 0, ys[np.clip(idx, 0, None)] if len(ys) else np.nan, np.nan)


# --- FID vs training compute: saturating power law, Huber on log residuals ---------------

PARAM_NAMES = ("E", "A", "alpha")


@dataclass
class SaturatingFit:
    """FID = E + A·C^(−α) (C in training Gflops), fitted robustly on log residuals.

    Internally C is scaled by C0 (the geometric mean of the data's compute):
    FID = E + A0·(C/C0)^(−α), A = A0·C0^α; ``A`` is reported in the data's units.
    ``on='frontier'``: fitted to the compute frontier (what the best model at each budget
    reaches); ``'all'``: to every evaluation pooled.
    """

    E: float
    A: float
    alpha: float
    A0: float
    C0: float
    ci: dict[str, tuple[float, float]]  # percentile pairs, also for parameters not identified
    intervals: dict[str, Interval]  # the honest form: identified or not, and how often on a bound
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
    used: pd.DataFrame  # label, trial, compute, fid, fitted, residual (ln), outlier
    excluded: pd.DataFrame  # label, reason
    n_boot: int
    n_boot_ok: int
    seed: int
    bootstrap: str  # "points" or "trials"
    boot: np.ndarray = field(repr=False)  # (n_boot_ok, 3): E, ln A0, alpha
    x_name: str = COMPUTE
    y_name: str = "fid"
    on: str = "frontier"
    n_evals: int = 0  # usable evaluations the frontier was drawn from

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
        scatter of a new (frontier) evaluation, a resampled log residual per bootstrap draw, and
        always contains the confidence band. ``extrapolated`` marks budgets beyond the data.
        """
        if kind not in ("confidence", "prediction"):
            raise ValueError("kind must be 'confidence' or 'prediction'")
        c = np.atleast_1d(np.asarray(compute, dtype=float))
        theta = np.array([self.E, math.log(self.A0), self.alpha])
        mid = self._curve(theta[None, :], c[None, :])[0]
        lo = hi = np.full_like(mid, np.nan)
        if len(self.boot):
            curves = self._curve(self.boot, c[None, :])
            tail = (1.0 - (level or self.level)) / 2.0 * 100.0
            lo, hi = np.percentile(curves, [tail, 100.0 - tail], axis=0)
            if kind == "prediction":
                rng = np.random.default_rng(self.seed + 1)
                res = self.used["residual"].to_numpy(float)
                noisy = curves * np.exp(rng.choice(res, size=curves.shape))
                lo, hi = cover(lo, hi, *np.percentile(noisy, [tail, 100.0 - tail], axis=0))
        cmin, cmax = self.used["compute"].min(), self.used["compute"].max()
        return pd.DataFrame({self.x_name: c, self.y_name: mid, "lo": lo, "hi": hi,
                             "extrapolated": (c < cmin) | (c > cmax)})

    @property
    def outliers(self) -> list[str]:
        return list(self.used.loc[self.used["outlier"], "label"])

    def _param_text(self, name: str, value: str, fmt: str = "{:.4g}") -> str:
        iv = self.intervals[name]
        return f"{value}  {iv.text(fmt)}" if not iv.identified else f"{value}  {self.level:.0%} CI {iv.text(fmt)}"

    def summary(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        where = (f"the compute frontier: {self.n} of {self.n_evals} evaluations" if self.on == "frontier"
                 else f"every evaluation: {self.n} points")
        lines = [
            (f"{self.y_name} vs training compute: {self.y_name} = E + A * C^(-alpha) on {where}, "
            f"{len(self.excluded)} excluded; C in Gflops"),
            f"  E     = {self._param_text('E', _g(self.E))}   (irreducible {self.y_name})",
            (f"  A     = {self._param_text('A', f'{self.A:.4g}')}   "
            f"(= {self.A0:.4g} * C0^alpha, C0 = {self.C0:.4g})"),
            f"  alpha = {self._param_text('alpha', f'{self.alpha:.4f}', '{:.4f}')}",
            (f"  robust fit: {self.loss} loss on ln residuals, f_scale {self.f_scale:.3g}; {state} "
            f"({self.message}); cost {self.cost:.4g}, {self.nfev} evaluations"),
            f"  starts: {self.n_starts_ok}/{self.n_starts} converged, {self.n_starts_agree} reach the best cost",
            *([f"  at a bound: {', '.join(self.at_bounds)} (E = 0 means the data show no saturation yet)"]
              if self.at_bounds else []),
            (f"  residual sd (ln) = {self.used['residual'].std(ddof=min(3, self.n - 1)):.4f}; "
            f"outliers (robust |z| > 3.5): {', '.join(self.outliers) or 'none'}"),
            f"  bootstrap: {self.n_boot_ok}/{self.n_boot} resamples of the {self.bootstrap}, seed {self.seed}",
        ]
        for label, reason in self.excluded.itertuples(index=False, name=None):
            lines.append(f"  excluded {label}: {reason}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        """The fit as plain JSON values (keys in the module docstring)."""
        params = {name: {"value": _num(v), **self.intervals[name].to_json()} for name, v in self.params().items()}
        return {"law": "E + A*C^-alpha", "x": self.x_name, "y": self.y_name, **params, "n": int(self.n),
                "n_evals": int(self.n_evals), "on": self.on, "bootstrap": self.bootstrap, "level": float(self.level),
                "converged": bool(self.converged), "at_bounds": list(self.at_bounds),
                "n_boot_ok": int(self.n_boot_ok), "outliers": [str(v) for v in self.outliers],
                "excluded": _excluded_json(self.excluded)}


def _residuals(theta: np.ndarray, z: np.ndarray, ly: np.ndarray) -> np.ndarray:
    pred = theta[0] + np.exp(theta[1]) * z ** (-theta[2])
    return ly - np.log(np.maximum(pred, 1e-300))


def _jacobian(theta: np.ndarray, z: np.ndarray, ly: np.ndarray) -> np.ndarray:
    power = np.exp(theta[1]) * z ** (-theta[2])
    pred = np.maximum(theta[0] + power, 1e-300)
    return np.column_stack([-1.0 / pred, -power / pred, power * np.log(z) / pred])


def _solve(theta0, z, ly, bounds, loss, f_scale):
    """One robust fit; a parameter the solver reports active is snapped onto its bound, so that
    "on the bound" is exact for ``percentile_interval`` (trf stops a hair inside it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = optimize.least_squares(_residuals, theta0, jac=_jacobian, args=(z, ly), bounds=bounds, loss=loss,
                                   f_scale=f_scale, method="trf", x_scale="jac", max_nfev=2000)
    r.x = np.where(r.active_mask < 0, bounds[0], np.where(r.active_mask > 0, bounds[1], r.x))
    return r


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


def _huber_scale(z: np.ndarray, ly: np.ndarray, starts: list[np.ndarray], bounds) -> float:
    """The Huber threshold from the data's own spread: HUBER_K robust sds (MAD) of the ln residuals
    of a least-squares fit, at least 0.01. A fixed threshold would call whatever lies beyond it
    an outlier, e.g. the two largest models of the paper's frontier at 0.05."""
    best = min((_solve(t, z, ly, bounds, "linear", 1.0) for t in starts), key=lambda r: r.cost)
    r = _residuals(best.x, z, ly)
    return max(HUBER_K * MAD_TO_SD * float(np.median(np.abs(r - np.median(r)))), 0.01)


def _enough(c: np.ndarray) -> bool:
    return len(c) >= MIN_SATURATING_POINTS and np.unique(c).size >= MIN_SATURATING_BUDGETS


def _saturating_points(evals: pd.DataFrame, x: str, y: str):
    """The usable evaluations: labels, compute, FID, trial of each, and the excluded ones."""
    if y not in evals or x not in evals:
        raise ValueError(f"no {y} values to fit against {x}")
    labels = _label(evals) if len(evals) else pd.Series(dtype=str)
    cx, cy = pd.to_numeric(evals[x], errors="coerce"), pd.to_numeric(evals[y], errors="coerce")
    ok = ((cx > 0) & (cy > 0) & np.isfinite(cx) & np.isfinite(cy)).to_numpy()
    excluded = pd.DataFrame({"label": labels[~ok].tolist(),
                             "reason": [f"missing or non-positive {x}/{y}"] * int((~ok).sum())})
    groups = (evals["trial"].astype(str).to_numpy() if "trial" in evals else labels.to_numpy().astype(str))[ok]
    return labels[ok].to_numpy().astype(str), cx[ok].to_numpy(float), cy[ok].to_numpy(float), groups, excluded


def _bootstrap_saturating(theta, c, fid, groups, C0, bounds, loss, f_scale, n_boot: int, bootstrap: str,
                          on: str, seed: int) -> np.ndarray:
    """Refits on ``n_boot`` resamples of whole trials (or points), each started at ``theta``.

    With ``on='frontier'`` each draw's own frontier is recomputed from its trials before the
    refit: the uncertainty is that of the best-per-budget curve, had other trials been run."""
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = resample(groups, rng, by=bootstrap)
        cb, fb = c[idx], fid[idx]
        if on == "frontier":
            keep = _frontier_mask(cb, fb)
            cb, fb = cb[keep], fb[keep]
        if not _enough(cb):
            continue
        r = _solve(theta, cb / C0, np.log(fb), bounds, loss, f_scale)
        if r.status > 0:
            boot.append(r.x)
    return np.asarray(boot, dtype=float).reshape(-1, 3)


def _intervals(boot: np.ndarray, theta: np.ndarray, C0: float, bounds, level: float) -> dict[str, Interval]:
    """Percentile intervals, with a parameter on its bound marked not identified. A = A0·C0^α
    is identified only where ln A0 is (its bound is in ln A0, so A inherits that verdict)."""
    lo, hi = bounds
    out = {name: percentile_interval(boot[:, i], level, point=float(theta[i]), lower=float(lo[i]),
                                     upper=float(hi[i])) for i, name in ((0, "E"), (1, "lnA0"), (2, "alpha"))}
    ln_a0 = out.pop("lnA0")
    a = percentile_interval(np.exp(boot[:, 1]) * C0 ** boot[:, 2], level)
    out["A"] = a if ln_a0.identified else replace(a, identified=False, at_bound=ln_a0.at_bound, bound=None)
    return {name: out[name] for name in PARAM_NAMES}


def fit_saturating(evals: pd.DataFrame, *, x: str = COMPUTE, y: str = FID, on: str = "frontier",
                   loss: str = "huber", f_scale: float | None = None,
                   alphas: Sequence[float] = (0.03, 0.08, 0.15, 0.25, 0.4, 0.6, 0.9, 1.4),
                   e_fractions: Sequence[float] = (0.0, 0.3, 0.6, 0.85, 0.97), n_boot: int = 1000,
                   bootstrap: str = "trials", seed: int = 0, level: float = 0.95) -> SaturatingFit:
    """FID = E + A·C^(−α) on the compute frontier of ``evals`` (``on='frontier'``) or on every row.

    Robust regression: ``least_squares(loss='huber')`` on ln FID − ln(model), ``f_scale`` the
    Huber threshold in log units (default: from the data's spread, ``_huber_scale``). Multi-start
    over a grid of α and E (as a fraction of the lowest FID); the best cost wins. Bootstrap: refit on resamples of whole trials
    (``'trials'``, keeps each curve together; the frontier is recomputed per draw) or of points,
    each started from the best fit. Too few points to fit raises ValueError saying so.
    """
    if bootstrap not in ("points", "trials") or on not in ("frontier", "all"):
        raise ValueError("bootstrap must be 'points' or 'trials', and on 'frontier' or 'all'")
    labels, c_all, fid_all, groups, excluded = _saturating_points(evals, x, y)
    keep = _frontier_mask(c_all, fid_all) if on == "frontier" else np.ones(len(c_all), dtype=bool)
    c, fid = c_all[keep], fid_all[keep]
    if not _enough(c):
        where = f"the compute frontier has {len(c)} points" if on == "frontier" else f"{len(c)} evaluations"
        raise ValueError(f"a saturating fit (3 parameters) needs at least {MIN_SATURATING_POINTS} points at "
                         f"{MIN_SATURATING_BUDGETS} or more distinct compute budgets; {where} "
                         f"at {np.unique(c).size} budgets ({len(excluded)} evaluations unusable)")
    C0 = float(np.exp(np.mean(np.log(c))))
    z, ly = c / C0, np.log(fid)
    bounds = (np.array([0.0, -60.0, 1e-4]), np.array([float(fid.max()), 60.0, 4.0]))

    starts = _starts(z, fid, alphas, e_fractions, *bounds)
    f_scale = _huber_scale(z, ly, starts, bounds) if f_scale is None else float(f_scale)
    results = [_solve(t, z, ly, bounds, loss, f_scale) for t in starts]
    good = [r for r in results if r.status > 0]
    best = min(good or results, key=lambda r: r.cost)
    n_agree = sum(1 for r in good if r.cost <= best.cost * (1 + 1e-6) + 1e-12)
    boot = _bootstrap_saturating(best.x, c_all, fid_all, groups, C0, bounds, loss, f_scale, n_boot, bootstrap,
                                 on, seed)
    E, la, alpha = (float(v) for v in best.x)
    resid = _residuals(best.x, z, ly)
    intervals = _intervals(boot, best.x, C0, bounds, level)
    used = pd.DataFrame({"label": labels[keep], "trial": groups[keep], "compute": c, "fid": fid,
                         "fitted": np.exp(ly - resid), "residual": resid, "outlier": mad_outliers(resid)})
    return SaturatingFit(
        E=E, A=float(math.exp(la) * C0**alpha), alpha=alpha, A0=float(math.exp(la)), C0=C0,
        ci={k: iv.pair() for k, iv in intervals.items()}, intervals=intervals,
        level=level, loss=loss, f_scale=f_scale, cost=float(best.cost), converged=bool(best.status > 0),
        message=str(best.message), nfev=int(best.nfev), n_starts=len(results), n_starts_ok=len(good),
        n_starts_agree=n_agree, at_bounds=[name for name, m in zip(PARAM_NAMES, best.active_mask) if m],
        used=used, excluded=excluded, n_boot=n_boot, n_boot_ok=len(boot), seed=seed, bootstrap=bootstrap,
        boot=boot, x_name=x, y_name=y.split("/")[-1], on=on, n_evals=len(c_all),
    )
