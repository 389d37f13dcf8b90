"""Plots: readable units, sizes in size order, log loss axes, legends off the data, the law plots,
the published overlay, and the sample gallery read back from a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.runs import StudyData
from analysis.schema import FID, LOSS, SAMPLES_ARTIFACT_DIR

# The demo's scale: three custom sizes whose names sort the wrong way round (m < s < xs).
SIZES = {"xs": 12_000, "s": 110_000, "m": 1_050_000}
PATCHES = (8, 4, 2)


def _gflops(size: str, patch: int) -> float:
    return SIZES[size] * 8e-9 * (16 // patch) ** 2 / 4


def study_frames(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """trials, evals, losses of a 3 × 3 demo-like study (Gflops 1e-4..0.1, params 12K..1M)."""
    rng = np.random.default_rng(seed)
    trials, evals, losses = [], [], []
    for size in ("m", "xs", "s"):  # not in size order, nor in name order
        for patch in PATCHES:
            g, trial, model = _gflops(size, patch), f"DiT-{size}-{patch}", f"DiT-{size}/{patch}"
            cell = dict(trial=trial, model=model, size=size, patch_size=patch, gflops=g)
            fid = 300 * (g * 1e3) ** -0.35
            trials.append({**cell, "params": SIZES[size] + patch, "final_fid": fid, "final_fid_step": 1300,
                           "final_loss_avg": 0.1 * (g * 1e3) ** -0.1, "run_id": None})
            for step in (650, 1300):
                evals.append({**cell, "params": SIZES[size], "global_batch": 32, "step": step,
                              "compute_gflops": g * 96 * step, FID: fid * (1300 / step) ** 0.3})
            for step in range(50, 1301, 50):
                loss = 0.3 * step ** -0.3 * (g * 1e3) ** -0.1 * np.exp(rng.normal(0, 0.03))
                losses.append({**cell, "step": step, "compute_gflops": g * 96 * step, LOSS: loss})
    return pd.DataFrame(trials), pd.DataFrame(evals), pd.DataFrame(losses)


@pytest.fixture(scope="module")
def frames():
    return study_frames()


def _check_images(paths: list[Path]) -> None:
    assert {p.suffix for p in paths} == {".png", ".svg"}
    for p in paths:
        assert p.stat().st_size > 1000
        head = p.read_bytes()[:2000]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in head


def _tick_texts(fig, ax, which: str = "x") -> list[str]:
    fig.draw_without_rendering()
    labels = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels if t.get_text()]


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _legend_clear_of_axes(fig, ax) -> bool:
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    return ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1 - 1


# ------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------


def test_flops_read_in_units_at_every_scale():
    from analysis.units import format_flops
    from orchestrator.progress import format_flops as progress_flops

    assert progress_flops is format_flops  # one definition, still importable from its old home
    cases = {0.000412: "412 Kflops", 118.6: "119 Gflops", 1e-9: "1 flops", 0.0004: "400 Kflops",
             0.03: "30 Mflops", 0.9996: "1 Gflops", 2.5e3: "2.5 Tflops", 3.6e10: "36 Eflops"}
    assert {g: format_flops(g) for g in cases} == cases
    assert format_flops(float("nan")) == "? flops"


def test_params_read_in_units_at_every_scale():
    from analysis.units import format_params

    cases = {12_345: "12.3K", 1_050_000: "1.05M", 675_000_000: "675M", 1_200_000_000: "1.2B", 512: "512",
             999_600: "1M", 33_000_000: "33M"}
    assert {n: format_params(n) for n in cases} == cases
    assert format_params(None) == "?"


def test_compute_is_labelled_as_multiply_adds_with_the_flop_conversion():
    from analysis.units import COMPUTE_LABEL

    assert "multiply-add" in COMPUTE_LABEL and "FLOPs = 2" in COMPUTE_LABEL


# ------------------------------------------------------------------------------------------
# Size order and colour
# ------------------------------------------------------------------------------------------


def test_custom_sizes_order_by_params_not_by_name(frames):
    from analysis.plot_style import ordered_sizes

    trials, evals, _ = frames
    assert sorted(SIZES) == ["m", "s", "xs"]  # what a name sort would give
    assert ordered_sizes(trials) == ["xs", "s", "m"]
    # Without params: Gflops compared at equal patch (patch 2 of xs outweighs patch 8 of m in raw Gflops).
    assert ordered_sizes(evals.drop(columns=["params"])) == ["xs", "s", "m"]
    # Without either: the size words themselves.
    assert ordered_sizes(pd.DataFrame({"size": ["m", "xs", "s", "d6-h96", "d4-h64"]})) == [
        "xs", "s", "m", "d4-h64", "d6-h96"]
    # The paper's sizes by params, and mixed with a study's.
    from analysis.runs import load_published

    paper = load_published()
    assert ordered_sizes(paper.trials) == ["S", "B", "L", "XL"]
    assert ordered_sizes(trials, paper.trials) == ["xs", "s", "m", "S", "B", "L", "XL"]


def test_legends_list_sizes_in_order_and_bigger_is_darker(frames):
    from matplotlib.colors import to_rgb

    from analysis.plot_style import size_color
    from analysis.plots import fid_vs_compute_figure, loss_curves_figure

    trials, evals, losses = frames
    fig = fid_vs_compute_figure(evals)
    texts = _legend_texts(fig.axes[0])
    assert [t for t in texts if t.startswith("DiT-")] == ["DiT-xs", "DiT-s", "DiT-m"]
    curves = _legend_texts(loss_curves_figure(losses).axes[1])
    assert curves.index("DiT-xs/2") < curves.index("DiT-s/8") < curves.index("DiT-m/8")

    def luminance(c: str) -> float:
        r, g, b = to_rgb(c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    shades = [luminance(size_color(s, ["xs", "s", "m"])) for s in ("xs", "s", "m")]
    assert shades[0] > shades[1] > shades[2]


# ------------------------------------------------------------------------------------------
# The paper's plots: log loss axes, readable ticks, legends outside
# ------------------------------------------------------------------------------------------


def test_loss_plots_have_log_axes(frames, tmp_path):
    from analysis.plots import loss_curves_figure, loss_vs_gflops_figure, plot_loss_curves

    trials, _, losses = frames
    fig = loss_curves_figure(losses)
    for ax in fig.axes[:2]:
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert loss_vs_gflops_figure(trials).axes[0].get_yscale() == "log"
    _check_images(plot_loss_curves(losses, tmp_path / "loss"))


def test_axes_print_flops_in_units_not_zeros(frames):
    from analysis.plots import fid_vs_gflops_figure, loss_curves_figure

    trials, evals, losses = frames
    fig = fid_vs_gflops_figure(evals)
    ax = fig.axes[0]
    ticks = _tick_texts(fig, ax)
    assert len(ticks) >= 2 and all(t.endswith("flops") for t in ticks), ticks
    assert "multiply-adds" in ax.get_xlabel()
    fig = loss_curves_figure(losses)
    compute_ticks = _tick_texts(fig, fig.axes[1])
    assert compute_ticks and all(t.endswith("flops") for t in compute_ticks) and "FLOPs = 2" in fig.axes[1].get_xlabel()


def test_legends_sit_outside_the_data(frames):
    from analysis.plots import fid_vs_compute_figure, fid_vs_gflops_figure, loss_curves_figure, loss_vs_gflops_figure

    trials, evals, losses = frames
    for fig, ax_index in ((fid_vs_gflops_figure(evals), 0), (fid_vs_compute_figure(evals), 0),
                          (loss_curves_figure(losses), 1), (loss_vs_gflops_figure(trials), 0)):
        assert _legend_clear_of_axes(fig, fig.axes[ax_index])


def test_the_published_overlay_adds_the_papers_points_and_law(frames, tmp_path):
    from analysis.fit import fit_saturating
    from analysis.plots import fid_vs_compute_figure, plot_fid_vs_compute
    from analysis.runs import load_published

    _, evals, _ = frames
    paper = load_published()
    plain = fid_vs_compute_figure(evals)
    ref_fit = fit_saturating(paper.evals, n_boot=20)
    fig = fid_vs_compute_figure(evals, reference=paper, reference_fit=ref_fit)
    texts = _legend_texts(fig.axes[0])
    assert paper.name in texts and not any(paper.name in t for t in _legend_texts(plain.axes[0]))
    assert any(t.startswith(f"{paper.name}: ") for t in texts)  # its law
    drawn = np.concatenate([c.get_offsets()[:, 0] for c in fig.axes[0].collections if len(c.get_offsets())])
    assert set(np.round(paper.evals["compute_gflops"], 0)) <= set(np.round(drawn, 0))
    assert fig.axes[0].get_xlim()[1] > paper.evals["compute_gflops"].max()
    _check_images(plot_fid_vs_compute(evals, tmp_path / "overlay", reference=paper, reference_fit=ref_fit))


# ------------------------------------------------------------------------------------------
# Residuals, backtest, the compute-optimal law
# ------------------------------------------------------------------------------------------


def test_residuals_are_coloured_by_patch_around_a_zero_line(frames, tmp_path):
    from matplotlib.colors import to_hex

    from analysis.plot_style import PATCH_COLORS
    from analysis.plots_laws import plot_residuals, residuals_figure

    trials, _, _ = frames
    used = pd.DataFrame({"label": trials["model"], "x": trials["gflops"], "patch_size": trials["patch_size"],
                         "size": trials["size"], "residual": np.linspace(-0.2, 0.2, len(trials))})
    fig = residuals_figure(used)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert any(np.allclose(line.get_ydata(), 0.0) for line in ax.get_lines())
    points = [c for c in ax.collections if len(c.get_offsets()) == 1]
    colours = {(round(float(c.get_offsets()[0, 1]), 6), to_hex(c.get_edgecolor()[0])) for c in points}
    expected = {(round(r, 6), PATCH_COLORS[int(p)].lower()) for r, p in zip(used["residual"], used["patch_size"])}
    assert colours == expected
    assert {"patch 2", "patch 4", "patch 8", "DiT-xs", "DiT-s", "DiT-m"} <= set(_legend_texts(ax))
    _check_images(plot_residuals(used, tmp_path / "res"))


def _loo(trials: pd.DataFrame) -> pd.DataFrame:
    loo = pd.DataFrame({"label": trials["model"], "actual": trials["final_fid"],
                        "predicted": trials["final_fid"] * np.exp(np.linspace(-0.1, 0.1, len(trials)))})
    loo["lo"], loo["hi"] = loo["predicted"] * 0.85, loo["predicted"] * 1.18
    loo.attrs["rmse_log"] = 0.0671
    return loo


def test_backtest_plots_observed_against_predicted_with_the_holdout_miss(frames, tmp_path):
    from analysis.plots_laws import backtest_figure, plot_backtest

    trials, _, _ = frames
    holdout = {"model": "DiT-m/2", "predicted": 20.0, "interval": [16.0, 25.0], "actual": 27.0}
    fig = backtest_figure(_loo(trials), holdout=holdout)
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert "RMSE(ln) = 0.067" in ax.get_title()
    assert any("held out: DiT-m/2" in t and "26% low" in t and "OUTSIDE" in t for t in _legend_texts(ax))
    assert any(list(line.get_xdata()) == list(line.get_ydata()) and len(line.get_xdata()) == 2
               for line in ax.get_lines())  # predicted = observed
    # The held-out point is drawn at (observed, predicted).
    assert any(np.allclose(np.column_stack([line.get_xdata(), line.get_ydata()]), [[27.0, 20.0]])
               for line in ax.get_lines() if len(line.get_xdata()) == 1)
    not_yet = backtest_figure(_loo(trials), holdout={**holdout, "actual": None})
    assert any("not observed yet" in t for t in _legend_texts(not_yet.axes[0]))
    _check_images(plot_backtest(_loo(trials), tmp_path / "bt", holdout=holdout))


def test_frontier_law_draws_the_law_and_the_isoflop_minima(frames, tmp_path):
    from analysis.plots_laws import frontier_law_figure, plot_frontier_law

    _, evals, _ = frames
    c = np.geomspace(1e2, 1e5, 20)
    optimal = pd.DataFrame({"compute_gflops": c, "n_opt": 1e3 * c ** 0.5, "d_opt": c, "fid": 300 * c ** -0.25})
    optimal["lo"], optimal["hi"] = optimal["fid"] * 0.9, optimal["fid"] * 1.1
    minima = pd.DataFrame({"compute_gflops": [3e2, 3e3, 3e4], "n_opt": [2e4, 6e4, 2e5], "fid_opt": [80, 45, 25]})
    fig = frontier_law_figure(evals, optimal, minima=minima)
    left, right = fig.axes[:2]
    assert "compute-optimal law" in _legend_texts(left) and "isoFLOP minima" in _legend_texts(left)
    assert (right.get_xscale(), right.get_yscale()) == ("log", "log")
    n_points = np.concatenate([col.get_offsets()[:, 1] for col in right.collections])
    assert sorted(n_points) == [2e4, 6e4, 2e5]
    assert all(t.endswith("K") or t.endswith("M") for t in _tick_texts(fig, right, "y"))
    assert len(frontier_law_figure(evals, optimal.drop(columns=["n_opt"])).axes) == 1
    _check_images(plot_frontier_law(evals, optimal, tmp_path / "law", minima=minima))


# ------------------------------------------------------------------------------------------
# The sample gallery, from a real MLflow store
# ------------------------------------------------------------------------------------------


def _png(path: Path, value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((48, 40, 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, frames):
    """A sqlite MLflow store with one run per trial; all but DiT-s/4 log two sample grids."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("gallery_store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("gallery", artifact_location=(root / "artifacts").as_uri())
    trials = frames[0].copy()
    run_ids = []
    for i, trial in enumerate(trials["trial"]):
        run = client.create_run(exp, run_name=trial)
        run_ids.append(run.info.run_id)
        if trial == "DiT-s-4":
            continue
        for step, value in ((650, 10), (1300, 200 + i)):
            local = _png(root / "local" / trial / f"samples_step{step:08d}.png", value)
            client.log_artifact(run.info.run_id, str(local), SAMPLES_ARTIFACT_DIR)
    trials["run_id"] = run_ids
    return StudyData(name="gallery", trials=trials, evals=frames[1], losses=frames[2], tracking_uri=uri)


def test_last_sample_grids_downloads_each_trials_highest_step(sample_store, tmp_path):
    from PIL import Image

    from analysis.gallery import grid_step, last_sample_grids

    grids = last_sample_grids(sample_store, tmp_path / "grids")
    assert set(grids) == set(sample_store.trials["trial"]) - {"DiT-s-4"}
    for trial, path in grids.items():
        assert path.is_file() and path.is_relative_to(tmp_path / "grids")
        assert grid_step(path) == 1300
        with Image.open(path) as img:
            assert img.getpixel((0, 0))[0] >= 200  # the last grid's pixels, not the first's
    assert last_sample_grids(StudyData("none", sample_store.trials, sample_store.evals, sample_store.losses),
                             tmp_path / "x") == {}


def test_gallery_lays_out_sizes_by_rows_and_patches_by_columns(sample_store, tmp_path):
    from analysis.gallery import gallery_figure, last_sample_grids, plot_sample_gallery

    grids = last_sample_grids(sample_store, tmp_path / "grids")
    fig = gallery_figure(sample_store.trials, grids)
    axes = fig.axes
    assert len(axes) == 9
    assert [axes[r * 3].get_ylabel() for r in range(3)] == ["DiT-xs", "DiT-s", "DiT-m"]
    assert [axes[c].get_title() for c in range(3)] == ["patch 8", "patch 4", "patch 2"]
    for r, size in enumerate(("xs", "s", "m")):
        for c, patch in enumerate((8, 4, 2)):
            ax = axes[r * 3 + c]
            assert ax.get_xlabel().startswith(f"DiT-{size}/{patch} · ")
            has_image = bool(ax.get_images())
            assert has_image == ((size, patch) != ("s", 4))
            if not has_image:
                assert [t.get_text() for t in ax.texts] == ["no samples"]
    assert "12K params" in axes[0].get_xlabel() and "FID" in axes[0].get_xlabel()
    _check_images(plot_sample_gallery(sample_store.trials, grids, tmp_path / "gallery"))
    assert plot_sample_gallery(sample_store.trials, {}, tmp_path / "empty") == []


# ------------------------------------------------------------------------------------------
# plot_study with every extra
# ------------------------------------------------------------------------------------------


def test_plot_study_draws_the_extras_under_their_names(sample_store, frames, tmp_path):
    from analysis.gallery import last_sample_grids
    from analysis.plots import plot_study

    trials = frames[0]
    used = pd.DataFrame({"label": trials["model"], "x": trials["gflops"], "residual": np.linspace(-0.1, 0.1, 9)})
    c = np.geomspace(1e2, 1e5, 10)
    optimal = pd.DataFrame({"compute_gflops": c, "n_opt": 1e3 * c ** 0.5, "fid": 300 * c ** -0.25})
    holdout = {"model": "DiT-m/2", "predicted": 20.0, "interval": [16.0, 25.0], "actual": 27.0}
    grids = last_sample_grids(sample_store, tmp_path / "grids")
    plots = plot_study(sample_store, tmp_path / "plots", residuals=used, backtest=(_loo(trials), holdout),
                       frontier_law=(optimal, None), grids=grids)
    assert {"gallery", "residuals", "backtest", "frontier_law", "fid_vs_compute", "loss_curves"} <= set(plots.paths)
    for name in ("gallery", "residuals", "backtest", "frontier_law"):
        _check_images(plots.paths[name])
    bare = plot_study(sample_store, tmp_path / "bare")
    assert not {"gallery", "residuals", "backtest", "frontier_law"} & set(bare.paths)
