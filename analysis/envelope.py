"""The compute-optimal frontier from whole training curves (Chinchilla's approach 3).

Every evaluation of every trial is a point (N, D, FID): N the model's forward Gflops per image
(multiply-adds, as ``dit.flops`` counts them), D the images it has seen. One surface is fitted
through all of them::

    FID(N, D) = E + A·N^(−a) + B·D^(−b)

and, with training compute C = 3·N·D (the project's ``compute_gflops``), minimising it along
C = const gives the compute-optimal model size and FID in closed form::

    N_opt(C) ∝ C^(b/(a+b))        FID_opt(C) − E ∝ C^(−ab/(a+b))

Why a robust fit on log residuals: FIDs span a decade or more and their noise is roughly
multiplicative; a Huber loss keeps one bad evaluation (a diverged sample batch) from bending
the surface. Why many starts: E trades off against the two power laws and the cost surface has
flat valleys; the best of a grid of starts is far more reliable than one start.

Why whole curves are resampled: the evaluations along one curve share the trial's seed and data
order, so the information about the N-dependence is one value per curve, not one per point
(``analysis.uncertainty``). A parameter whose fit sits on its bound is reported as not
identified, with how often the resamples hit it.

``envelope_frame`` turns a study's ``evals`` into the CSV this fit reads (model, gflops,
images_seen, fid); ``analysis.isoflop`` cross-checks N_opt with isoFLOP profiles (approach 2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize

from analysis.schema import FID
from analysis.uncertainty import Interval, cover, mad_outliers, percentile_interval, resample
from dit.errors import ConfigError

ENVELOPE_COLUMNS = ("model", "gflops", "images_seen", "fid")
NUMERIC = ("gflops", "images_seen", "fid")
PARAMS = ("E", "A", "a", "B", "b")
EXPONENT_BOUNDS = (1e-3, 3.0)
# ln of the amplitudes at the data's geometric-mean N and D: wide enough never to bind on a real
# curve; a fit that reaches one says that term has vanished from the data.
LOG_AMPLITUDE_BOUNDS = (-40.0, 40.0)
MIN_POINTS = 8
MIN_CURVES = 3  # curves with distinct N: fewer cannot separate A·N^-a from E
START_EXPONENTS = (0.15, 0.4, 1.0)
START_E_FRACTIONS = (0.0, 0.5, 0.9)


def _num(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").astype(float)


# ------------------------------------------------------------------------------------------
# The per-evaluation frame and its CSV
# ------------------------------------------------------------------------------------------


def _curve_names(evals: pd.DataFrame) -> pd.Series:
    """One name per training curve: the model, or the trial where a model name repeats across
    trials (a block-design study trains the same model several times)."""
    if "model" not in evals:
        return evals["trial"].astype(str)
    model = evals["model"].astype(str).where(evals["model"].notna(), None)
    if "trial" not in evals:
        return model
    trial = evals["trial"].astype(str)
    per_model = evals.groupby(model.fillna(trial).to_numpy())["trial"].transform("nunique")
    return model.where(model.notna() & (per_model <= 1), trial)


def _from_evals(evals: pd.DataFrame, y: str) -> tuple[pd.DataFrame, pd.Series]:
    """All rows of ``evals`` in the envelope columns (bad ones included), and a label per row."""
    if y not in evals or "gflops" not in evals:
        raise ValueError(f"the evaluations have no {y!r} or 'gflops' column (columns: {list(evals.columns)})")
    n = _num(evals["gflops"])
    d = pd.Series(np.nan, index=evals.index)
    if "global_batch" in evals and "step" in evals:
        d = _num(evals["global_batch"]) * _num(evals["step"])
    if "compute_gflops" in evals:
        # Where batch or step is missing, the images follow from the compute: C = 3 N D.
        d = d.where(d > 0, _num(evals["compute_gflops"]) / (3.0 * n))
    names = _curve_names(evals) if len(evals) else pd.Series(dtype=object)
    frame = pd.DataFrame({"model": names, "gflops": n, "images_seen": d, "fid": _num(evals[y])},
                         index=evals.index)
    steps = evals["step"].astype(str) if "step" in evals else d.map("{:.6g} images".format)
    return frame, names.astype(str) + "@" + steps


def _usable(frame: pd.DataFrame, group: str, labels: pd.Series | None = None) -> tuple[pd.DataFrame,
                                                                                       pd.DataFrame]:
    """The rows with a curve name and finite positive N, D and FID; the others with a reason."""
    bad = {c: ~(np.isfinite(frame[c].to_numpy(float)) & (frame[c].to_numpy(float) > 0)) for c in NUMERIC}
    no_group = frame[group].isna().to_numpy()
    ok = ~(no_group | bad["gflops"] | bad["images_seen"] | bad["fid"])
    if labels is None:
        labels = frame[group].astype(str) + "@" + frame["images_seen"].map("{:.6g} images".format)
    names = labels.astype(str).to_numpy()
    reasons = []
    for i in np.flatnonzero(~ok):
        what = [c for c in NUMERIC if bad[c][i]] + ([group] if no_group[i] else [])
        reasons.append((names[i], f"missing or non-positive {'/'.join(what)}"))
    excluded = pd.DataFrame(reasons, columns=["label", "reason"])
    return frame[ok].reset_index(drop=True), excluded


def envelope_frame(evals: pd.DataFrame, y: str = FID) -> pd.DataFrame:
    """A study's ``evals`` as the ``--law envelope`` table: model, gflops, images_seen, fid.

    One row per evaluation with finite positive values; images_seen = global_batch × step
    (or compute_gflops / (3·gflops) where those are missing); ``model`` names one curve (the
    trial's name where a model name repeats across trials). ``to_csv(index=False)`` of it is
    the CSV ``read_envelope_csv`` reads back."""
    frame, labels = _from_evals(evals, y)
    return _usable(frame, "model", labels)[0][list(ENVELOPE_COLUMNS)]


def read_envelope_csv(path: str | Path, group: str = "model") -> pd.DataFrame:
    """An ``--law envelope`` CSV: one row per evaluation with ``group``, gflops, images_seen, fid.

    Raises ``ConfigError`` naming the file and the missing column(s)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"envelope table {str(path)!r} does not exist")
    try:
        # round_trip: the floats read back bit for bit, so a CSV fits exactly like its frame.
        df = pd.read_csv(path, dtype={group: str}, float_precision="round_trip")
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"envelope table {path}: not a readable CSV ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in (group, *NUMERIC) if c not in df.columns]
    if missing:
        raise ConfigError(f"envelope table {path}: missing column(s) {missing}; it has {list(df.columns)} "
                          f"(one row per evaluation: {group}, gflops per image, images_seen, fid)")
    for c in NUMERIC:
        df[c] = _num(df[c])
    return df


def _as_envelope(df: pd.DataFrame, group: str) -> tuple[pd.DataFrame, pd.Series | None]:
    """An envelope table as it is, or a study's ``evals`` converted (labels name trial and step)."""
    if all(c in df for c in (group, *NUMERIC)):
        frame = df[[group, *NUMERIC]].copy()
        for c in NUMERIC:
            frame[c] = _num(frame[c])
        return frame, None
    if FID in df:
        frame, labels = _from_evals(df, FID)
        return frame.rename(columns={"model": group}), labels
    missing = [c for c in (group, *NUMERIC) if c not in df]
    raise ValueError(f"an envelope fit needs the columns {[group, *NUMERIC]} (missing {missing}) "
                     f"or a study's evals with {FID!r}")


def envelope_rows(df: pd.DataFrame, group: str = "model") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable rows of an envelope table or a study's ``evals`` (``group``, gflops,
    images_seen, fid), and the rows left out with a reason (label, reason)."""
    frame, labels = _as_envelope(df, group)
    return _usable(frame, group, labels)


# ------------------------------------------------------------------------------------------
# The surface, its residuals and the solver
# ------------------------------------------------------------------------------------------
# theta = (E, ln A0, a, ln B0, b) with FID = E + A0·n^-a + B0·d^-b, n = N/N0, d = D/D0 (N0, D0 the
# geometric means): amplitudes at the data's centre are O(FID), so the solver is well scaled.


def _surface(theta: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    t = np.atleast_2d(theta)
    return (t[:, 0:1] + np.exp(t[:, 1:2]) * n ** (-t[:, 2:3]) + np.exp(t[:, 3:4]) * d ** (-t[:, 4:5]))


def _residuals(theta: np.ndarray, n: np.ndarray, d: np.ndarray, ly: np.ndarray) -> np.ndarray:
    return ly - np.log(np.maximum(_surface(theta, n, d)[0], 1e-300))


def _jacobian(theta: np.ndarray, n: np.ndarray, d: np.ndarray, ly: np.ndarray) -> np.ndarray:
    ta = np.exp(theta[1]) * n ** (-theta[2])
    tb = np.exp(theta[3]) * d ** (-theta[4])
    pred = np.maximum(theta[0] + ta + tb, 1e-300)
    return np.column_stack([-1.0 / pred, -ta / pred, ta * np.log(n) / pred, -tb / pred, tb * np.log(d) / pred])


def _solve(theta0: np.ndarray, n: np.ndarray, d: np.ndarray, ly: np.ndarray, bounds, loss: str,
           f_scale: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return optimize.least_squares(_residuals, theta0, jac=_jacobian, args=(n, d, ly), bounds=bounds,
                                      loss=loss, f_scale=f_scale, method="trf", x_scale="jac", max_nfev=3000)


def _starts(n: np.ndarray, d: np.ndarray, fid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """A grid over a, b and E; for each, the amplitudes by non-negative least squares on FID − E."""
    out = []
    for a in START_EXPONENTS:
        for b in START_EXPONENTS:
            for frac in START_E_FRACTIONS:
                e = frac * float(fid.min())
                amp, _ = optimize.nnls(np.column_stack([n ** -a, d ** -b]), fid - e)
                la, lb = (math.log(max(v, 1e-6 * float(fid.min()))) for v in amp)
                out.append(np.clip([e, la, a, lb, b], lo + 1e-9, hi - 1e-9))
    return out


def _enough(used: pd.DataFrame, group: str) -> str | None:
    """Why these rows cannot identify the surface, or None."""
    curves = used.groupby(group)["gflops"].median()
    if len(used) < MIN_POINTS:
        return f"at least {MIN_POINTS} usable evaluations (got {len(used)})"
    if curves.nunique() < MIN_CURVES:
        return f"at least {MIN_CURVES} curves with distinct gflops (got {curves.nunique()})"
    if used["images_seen"].nunique() < 3:
        return f"at least 3 distinct images_seen (got {used['images_seen'].nunique()})"
    return None


def _bootstrap(theta: np.ndarray, n: np.ndarray, d: np.ndarray, ly: np.ndarray, groups: np.ndarray, bounds,
               loss: str, f_scale: float, n_boot: int, by: str, seed: int) -> np.ndarray:
    """Refits on ``n_boot`` resamples (whole curves, or points), each started at the best fit."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = resample(groups, rng, by=by)
        if np.unique(n[idx]).size < MIN_CURVES or np.unique(d[idx]).size < 3:
            continue  # this draw cannot separate the terms; count it as failed
        r = _solve(theta, n[idx], d[idx], ly[idx], bounds, loss, f_scale)
        if r.status > 0:
            out.append(r.x)
    return np.asarray(out, dtype=float).reshape(-1, 5)


# ------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------


def _g(v: float) -> str:
    return "0" if abs(v) < 1e-8 else f"{v:.4g}"


def _finite_pair(iv: Interval) -> list[float] | None:
    lo, hi = iv.pair()
    return [float(lo), float(hi)] if math.isfinite(lo) and math.isfinite(hi) else None


def _tails(level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    return tail, 100.0 - tail


@dataclass
class EnvelopeFit:
    """FID(N, D) = E + A·N^(−a) + B·D^(−b) fitted through whole training curves.

    ``theta`` and ``boot`` hold (E, ln A0, a, ln B0, b) with N and D scaled by N0 and D0;
    A = A0·N0^a and B = B0·D0^b are the amplitudes in the data's units."""

    theta: np.ndarray
    N0: float
    D0: float
    intervals: dict[str, Interval]
    n_opt_ci: Interval
    alpha_ci: Interval
    level: float
    loss: str
    f_scale: float
    cost: float
    converged: bool
    message: str
    nfev: int
    n_starts: int
    n_starts_ok: int
    n_starts_agree: int  # converged starts within 1e-6 (relative) of the best cost
    at_bounds: list[str]  # parameters the best fit pinned to a bound
    used: pd.DataFrame  # group, gflops, images_seen, fid, fitted, residual (ln), outlier
    excluded: pd.DataFrame  # label, reason
    group: str
    n_boot: int
    seed: int
    bootstrap: str  # "trials" (whole curves) or "points"
    boot: np.ndarray = field(repr=False)  # (n_boot_ok, 5) in theta's parametrisation

    @property
    def n(self) -> int:
        return len(self.used)

    @property
    def n_groups(self) -> int:
        return int(self.used[self.group].nunique())

    @property
    def n_boot_ok(self) -> int:
        return len(self.boot)

    def params(self) -> dict[str, float]:
        E, la, a, lb, b = (float(v) for v in self.theta)
        return {"E": E, "A": math.exp(la) * self.N0**a, "a": a, "B": math.exp(lb) * self.D0**b, "b": b}

    @property
    def n_opt_exponent(self) -> float:
        """N_opt ∝ C^(b/(a+b))."""
        return float(self.theta[4] / (self.theta[2] + self.theta[4]))

    @property
    def alpha(self) -> float:
        """FID_opt − E ∝ C^(−ab/(a+b))."""
        a, b = self.theta[2], self.theta[4]
        return float(a * b / (a + b))

    def _band(self, values: np.ndarray, level: float | None) -> tuple[np.ndarray, np.ndarray]:
        if not len(values):
            nan = np.full(values.shape[1:], np.nan)
            return nan, nan
        return tuple(np.percentile(values, _tails(level or self.level), axis=0))

    def predict(self, gflops: float | Sequence[float], images_seen: float | Sequence[float],
                kind: str = "confidence", level: float | None = None) -> pd.DataFrame:
        """FID at (gflops, images_seen), broadcast, with a bootstrap band.

        ``'confidence'``: the band of the fitted surface. ``'prediction'``: of a new evaluation
        (a resampled log residual per draw); it always contains the confidence band."""
        if kind not in ("confidence", "prediction"):
            raise ValueError("kind must be 'confidence' or 'prediction'")
        N, D = np.broadcast_arrays(np.atleast_1d(np.asarray(gflops, float)),
                                   np.atleast_1d(np.asarray(images_seen, float)))
        n, d = N / self.N0, D / self.D0
        mid = _surface(self.theta, n, d)[0]
        curves = _surface(self.boot, n[None, :], d[None, :]) if len(self.boot) else np.empty((0, len(n)))
        lo, hi = self._band(curves, level)
        if kind == "prediction" and len(curves):
            rng = np.random.default_rng(self.seed + 1)
            noisy = curves * np.exp(rng.choice(self.used["residual"].to_numpy(float), size=curves.shape))
            lo, hi = cover(lo, hi, *self._band(noisy, level))
        u = self.used
        outside = ((N < u["gflops"].min()) | (N > u["gflops"].max()) | (D < u["images_seen"].min())
                   | (D > u["images_seen"].max()))
        return pd.DataFrame({"gflops": N, "images_seen": D, "fid": mid, "lo": lo, "hi": hi,
                             "extrapolated": outside})

    def _n_opt_scaled(self, theta: np.ndarray, compute: np.ndarray) -> np.ndarray:
        """N_opt / N0 of each theta row at each budget: a·A0·n^-a = b·B0·d^-b with n·d = C/(3 N0 D0)."""
        t = np.atleast_2d(theta)
        a, b = t[:, 2:3], t[:, 4:5]
        ratio = (a * np.exp(t[:, 1:2])) / (b * np.exp(t[:, 3:4]))
        c = compute[None, :] / (3.0 * self.N0 * self.D0)
        return ratio ** (1.0 / (a + b)) * c ** (b / (a + b))

    def optimal(self, compute: float | Sequence[float], level: float | None = None) -> pd.DataFrame:
        """The compute-optimal frontier of the fitted law: at each budget C (Gflops, C = 3 N D)
        the N that minimises FID, its D = C/(3N), the FID there and its bootstrap band."""
        c = np.atleast_1d(np.asarray(compute, dtype=float))
        n = self._n_opt_scaled(self.theta, c)[0]
        d = c / (3.0 * self.N0 * self.D0) / n
        fid = _surface(self.theta, n, d)[0]
        if len(self.boot):
            nb = self._n_opt_scaled(self.boot, c)
            db = c[None, :] / (3.0 * self.N0 * self.D0) / nb
            rows = [_surface(self.boot[i], nb[i], db[i])[0] for i in range(len(self.boot))]
            lo, hi = self._band(np.asarray(rows), level)
        else:
            lo = hi = np.full_like(c, np.nan)
        return pd.DataFrame({"compute_gflops": c, "n_opt": n * self.N0, "d_opt": d * self.D0, "fid": fid,
                             "lo": lo, "hi": hi})

    def recommend(self, compute: float, sizes: pd.DataFrame, global_batch: int | None = None) -> dict:
        """Which of the candidate models (``sizes``: model, gflops[, global_batch]) reaches the
        lowest predicted FID when trained on ``compute`` Gflops (D = C / (3 N) images).

        Returns the model, its predicted FID with interval, the images (and steps, given a batch)
        it would see, how often the bootstrap draws agree it is best, and the law's N_opt."""
        if not len(sizes) or not {"model", "gflops"} <= set(sizes.columns):
            raise ValueError("sizes needs rows with the columns model and gflops")
        N = _num(sizes["gflops"]).to_numpy()
        D = float(compute) / (3.0 * N)
        pred = self.predict(N, D)
        best = int(np.nanargmin(pred["fid"].to_numpy()))
        draws = _surface(self.boot, (N / self.N0)[None, :], (D / self.D0)[None, :]) if len(self.boot) else None
        agree = float(np.mean(np.argmin(draws, axis=1) == best)) if draws is not None else math.nan
        batch = global_batch
        if batch is None and "global_batch" in sizes and pd.notna(sizes["global_batch"].iloc[best]):
            batch = int(sizes["global_batch"].iloc[best])
        opt = self.optimal([compute]).iloc[0]
        nb = self._n_opt_scaled(self.boot, np.array([float(compute)]))[:, 0] * self.N0 if len(self.boot) else []
        row = pred.iloc[best]
        return {
            "compute_gflops": float(compute), "model": str(sizes["model"].iloc[best]), "gflops": float(N[best]),
            "fid": float(row["fid"]), "fid_interval": [float(row["lo"]), float(row["hi"])],
            "images_seen": float(D[best]), "steps": (int(round(D[best] / batch)) if batch else None),
            "global_batch": batch, "best_in_draws": agree, "extrapolated": bool(row["extrapolated"]),
            "n_opt": float(opt["n_opt"]), "n_opt_interval": _finite_pair(percentile_interval(nb, self.level)),
            "candidates": [{"model": str(m), "gflops": float(g), "images_seen": float(dd), "fid": float(f),
                            "lo": float(lo), "hi": float(hi)}
                           for m, g, dd, f, lo, hi in zip(sizes["model"], N, D, pred["fid"], pred["lo"],
                                                           pred["hi"])],
        }

    def summary(self) -> str:
        """The law, each parameter with its interval (or why it has none), the exponents and the fit."""
        p, pct = self.params(), f"{self.level:.0%}"
        state = "converged" if self.converged else "NOT converged"
        outliers = list(self.used.loc[self.used["outlier"], self.group].astype(str))
        lines = [
            (f"fid vs model size and data: fid = E + A * N^-a + B * D^-b  ({self.n} evaluations on "
             f"{self.n_groups} curves, {len(self.excluded)} excluded; N = forward Gflops per image, "
             f"D = images seen, C = 3 N D Gflops)"),
            *(f"  {k:<2}= {_g(p[k]):<10} {pct} {self.intervals[k].text()}" for k in PARAMS),
            (f"  compute-optimal: N_opt ~ C^{self.n_opt_exponent:.4f} {pct} {self.n_opt_ci.text('{:.4f}')};  "
             f"fid_opt - E ~ C^-{self.alpha:.4f} {pct} {self.alpha_ci.text('{:.4f}')}"),
            (f"  robust fit: {self.loss} loss on ln residuals, f_scale {self.f_scale:g}; {state} ({self.message}); "
             f"cost {self.cost:.4g}, {self.nfev} evaluations; N0 = {self.N0:.4g}, D0 = {self.D0:.4g}"),
            f"  starts: {self.n_starts_ok}/{self.n_starts} converged, {self.n_starts_agree} reach the best cost",
            *([f"  at a bound: {', '.join(self.at_bounds)}"] if self.at_bounds else []),
            (f"  residual sd (ln) = {self.used['residual'].std(ddof=min(5, self.n - 1)):.4f}; "
             f"outliers (robust z > 3.5): {', '.join(outliers) or 'none'}"),
            (f"  bootstrap: {self.n_boot_ok}/{self.n_boot} refits on resamples of the "
             f"{'whole curves' if self.bootstrap == 'trials' else 'points'}, seed {self.seed}"),
        ]
        lines += [f"  excluded {lab}: {why}" for lab, why in self.excluded.itertuples(index=False, name=None)]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Plain Python values: E, A, a, B, b as {value, interval, level, identified, at_bound_fraction},
        the exponents with their intervals, and the fit's bookkeeping."""
        p = self.params()
        out: dict[str, object] = {k: {"value": float(p[k]), **self.intervals[k].to_json()} for k in PARAMS}
        out.update({
            "law": "fid = E + A * gflops^-a + B * images_seen^-b",
            "n_opt_exponent": self.n_opt_exponent, "n_opt_exponent_ci": _finite_pair(self.n_opt_ci),
            "alpha": self.alpha, "alpha_ci": _finite_pair(self.alpha_ci),
            "n": self.n, "n_groups": self.n_groups, "converged": bool(self.converged), "level": float(self.level),
            "bootstrap": self.bootstrap, "n_boot": int(self.n_boot), "n_boot_ok": self.n_boot_ok,
            "seed": int(self.seed), "loss": self.loss, "f_scale": float(self.f_scale),
            "at_bounds": list(self.at_bounds),
            "excluded": [{"label": str(lab), "reason": str(why)}
                         for lab, why in self.excluded.itertuples(index=False, name=None)],
        })
        return out


# ------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------


def _intervals(theta: np.ndarray, boot: np.ndarray, N0: float, D0: float, lo: np.ndarray, hi: np.ndarray,
               level: float) -> dict[str, Interval]:
    """Percentile intervals, not identified where the fit or the resamples sit on a bound.

    The amplitudes are checked on their fitted scale (ln A0, ln B0), then reported in data units."""
    out = {}
    for name, i in (("E", 0), ("a", 2), ("b", 4)):
        out[name] = percentile_interval(boot[:, i], level, point=theta[i], lower=lo[i], upper=hi[i])
    for name, i, scale in (("A", 1, N0), ("B", 3, D0)):
        raw = percentile_interval(boot[:, i], level, point=theta[i], lower=lo[i], upper=hi[i])
        iv = percentile_interval(np.exp(boot[:, i]) * scale ** boot[:, i + 1], level)
        out[name] = iv if raw.identified else Interval(iv.lo, iv.hi, level, False, raw.at_bound, None)
    return out


def fit_envelope(
    df: pd.DataFrame,
    *,
    group: str = "model",
    loss: str = "huber",
    f_scale: float = 0.05,
    n_boot: int = 200,
    bootstrap: str = "trials",
    seed: int = 0,
    level: float = 0.95,
) -> EnvelopeFit:
    """FID(N, D) = E + A·N^(−a) + B·D^(−b) through every evaluation of every curve.

    ``df``: an envelope table (``group``, gflops, images_seen, fid; see ``envelope_frame``) or a
    study's ``evals``. Robust least squares (``loss``, threshold ``f_scale`` in ln units) on
    ln FID − ln surface, N and D scaled by their geometric means, from a grid of starts (the best
    cost wins); bounds E ∈ [0, min FID], a, b ∈ [0.001, 3]. Intervals from ``n_boot`` refits on
    resamples of whole curves (``bootstrap='trials'``) or of points (``'points'``)."""
    if bootstrap not in ("trials", "points"):
        raise ValueError("bootstrap must be 'trials' or 'points'")
    used, excluded = envelope_rows(df, group)
    why = _enough(used, group)
    if why:
        raise ValueError(f"an envelope fit (5 parameters) needs {why}")
    N, D, fid = (used[c].to_numpy(float) for c in NUMERIC)
    N0, D0 = float(np.exp(np.log(N).mean())), float(np.exp(np.log(D).mean()))
    n, d, ly = N / N0, D / D0, np.log(fid)
    lo = np.array([0.0, LOG_AMPLITUDE_BOUNDS[0], EXPONENT_BOUNDS[0], LOG_AMPLITUDE_BOUNDS[0], EXPONENT_BOUNDS[0]])
    hi = np.array([float(fid.min()), LOG_AMPLITUDE_BOUNDS[1], EXPONENT_BOUNDS[1], LOG_AMPLITUDE_BOUNDS[1],
                   EXPONENT_BOUNDS[1]])

    results = [_solve(t, n, d, ly, (lo, hi), loss, f_scale) for t in _starts(n, d, fid, lo, hi)]
    good = [r for r in results if r.status > 0]
    best = min(good or results, key=lambda r: r.cost)
    groups = used[group].astype(str).to_numpy()
    boot = _bootstrap(best.x, n, d, ly, groups, (lo, hi), loss, f_scale, n_boot, bootstrap, seed)

    resid = _residuals(best.x, n, d, ly)
    used = used.assign(fitted=np.exp(ly - resid), residual=resid, outlier=mad_outliers(resid))
    a_s, b_s = boot[:, 2], boot[:, 4]
    return EnvelopeFit(
        theta=best.x.astype(float), N0=N0, D0=D0, intervals=_intervals(best.x, boot, N0, D0, lo, hi, level),
        n_opt_ci=percentile_interval(b_s / (a_s + b_s), level),
        alpha_ci=percentile_interval(a_s * b_s / (a_s + b_s), level),
        level=level, loss=loss, f_scale=f_scale, cost=float(best.cost), converged=bool(best.status > 0),
        message=str(best.message), nfev=int(best.nfev), n_starts=len(results), n_starts_ok=len(good),
        n_starts_agree=sum(1 for r in good if r.cost <= best.cost * (1 + 1e-6) + 1e-12),
        at_bounds=[k for k, m in zip(("E", "A", "a", "B", "b"), best.active_mask) if m],
        used=used, excluded=excluded, group=group, n_boot=n_boot, seed=seed, bootstrap=bootstrap, boot=boot,
    )
