"""Loss laws beside the FID laws: loss against training compute, and the map from loss to FID.

Liang et al. (2024, "Scaling Laws for Diffusion Transformers") fit the diffusion loss against
compute as a power law and then map loss to FID; a loss law is cheaper to measure (every step
logs it) and less noisy than FID, so it is the first place to look for a trend.

The loss used is the evaluation loss (``eval/loss``) where the study logged one, else the
training loss averaged over the logged steps just before each evaluation (a single step's
training loss is one noisy micro-batch). Which one was used is named in the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.schema import EVAL_PREFIX, FID, LOSS

EVAL_LOSS = f"{EVAL_PREFIX}loss"
LOSS_AT_EVAL = "loss"  # the column loss_points adds
WINDOW = 0.1  # training loss averaged over the last 10% of the steps before an evaluation


@dataclass
class LossLaws:
    """The loss-vs-compute law, the FID-vs-loss law, and why either is missing."""

    source: str  # "eval/loss" or "train/loss (windowed mean)"
    points: pd.DataFrame  # one row per evaluation: trial, model, step, compute_gflops, loss, fid
    compute: Any = None  # SaturatingFit of loss on the compute frontier
    fid_vs_loss: Any = None  # PowerLawFit: ln FID = a + b ln loss
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"loss laws (loss = {self.source}, {len(self.points)} evaluations)"]
        if self.compute is not None:
            lines.append(self.compute.summary())
        else:
            lines.append(f"  loss vs compute: {self.errors.get('compute', 'not fitted')}")
        if self.fid_vs_loss is not None:
            lines.append(self.fid_vs_loss.summary())
        else:
            lines.append(f"  FID vs loss: {self.errors.get('fid_vs_loss', 'not fitted')}")
        return "\n".join(lines)


def _windowed_loss(losses: pd.DataFrame, trial: str, step: float) -> float:
    """Mean training loss over the logged steps in (step - WINDOW*step, step]."""
    mine = losses[(losses["trial"] == trial) & (losses["step"] <= step) & (losses["step"] > step * (1 - WINDOW))]
    values = pd.to_numeric(mine[LOSS], errors="coerce").dropna()
    return float(values.mean()) if len(values) else float("nan")


def loss_points(evals: pd.DataFrame, losses: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Each evaluation with its loss: ``eval/loss`` when logged, else the windowed training loss."""
    cols = [c for c in ("trial", "model", "size", "patch_size", "gflops", "step", "compute_gflops") if c in evals]
    out = evals[cols].copy()
    out["fid"] = pd.to_numeric(evals[FID], errors="coerce") if FID in evals else np.nan
    if EVAL_LOSS in evals and evals[EVAL_LOSS].notna().any():
        out[LOSS_AT_EVAL] = pd.to_numeric(evals[EVAL_LOSS], errors="coerce")
        return out.reset_index(drop=True), EVAL_LOSS
    if losses is None or not len(losses) or LOSS not in losses:
        out[LOSS_AT_EVAL] = np.nan
        return out.reset_index(drop=True), f"{LOSS} (windowed mean)"
    out[LOSS_AT_EVAL] = [_windowed_loss(losses, t, s) for t, s in zip(out["trial"], out["step"].astype(float))]
    return out.reset_index(drop=True), f"{LOSS} (windowed mean)"


def fit_loss_laws(evals: pd.DataFrame, losses: pd.DataFrame, *, n_boot: int = 500, seed: int = 0,
                  level: float = 0.95) -> LossLaws:
    """Loss = E + A C^-alpha on the compute frontier, and ln FID = a + b ln loss over every evaluation.

    Either fit that the data cannot support is recorded in ``errors``, never raised."""
    from analysis.fit import fit_power_law, fit_saturating

    points, source = loss_points(evals, losses)
    out = LossLaws(source=source, points=points)
    usable = points.dropna(subset=[LOSS_AT_EVAL, "compute_gflops"])
    try:
        out.compute = fit_saturating(usable, x="compute_gflops", y=LOSS_AT_EVAL, n_boot=n_boot, seed=seed,
                                     level=level)
    except (ValueError, np.linalg.LinAlgError) as err:
        out.errors["compute"] = str(err)
    both = usable.dropna(subset=["fid"])
    try:
        labels = both["model"].astype(str) + "@" + both["step"].astype(str)
        out.fid_vs_loss = fit_power_law(both[LOSS_AT_EVAL], both["fid"], labels, x_name="loss", y_name="fid",
                                        n_boot=n_boot, seed=seed, level=level,
                                        groups=both["trial"].astype(str).to_numpy())
    except (ValueError, np.linalg.LinAlgError) as err:
        out.errors["fid_vs_loss"] = str(err)
    return out
