"""Grid expansion: a validated :class:`StudySpec` becomes its :class:`Cell` s, one per trial.

The steps, each reporting its problems before the next runs (so an error names the spec
entry that caused it, and the first broken step is the one reported):

0. count the cells (axis lengths multiplied) against ``grid.max_cells``, before any is made;
1. check the axes on their own (sizes, patches, blocks, recipe axes);
2. the product of the axes, minus ``grid.exclude``, then the ``grid.include`` cells;
3. a name for each cell (:mod:`orchestrator.spec.names`), unique;
4. resources by size (``resources.by_size``);
5. a TrainConfig and a TrialConfig for each cell: their validators are the rules.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dit.errors import ConfigError
from dit.models import BLOCKS, SIZES, model_config
from dit.train import TrainConfig
from orchestrator.spec.cells import Cell
from orchestrator.spec.data import DataInfo, _is_remote
from orchestrator.spec.limits import check_grid_size
from orchestrator.spec.model import Grid, SizeEntry, StudySpec
from orchestrator.spec.names import cell_name
from orchestrator.spec.problems import _join, _loc, _msg, _Problems
from orchestrator.spec.recipe import CELL_FIELDS, RECIPE_FIELDS, _coerce_recipe, _recipe_default
from orchestrator.spec.resources import Resources, SizeResources


@dataclass
class _Draft:
    size: SizeEntry
    patch: int
    block: str
    recipe: dict[str, Any]  # axis values (coerced)
    origin: str  # "grid" or "grid.include[i]"
    origin_paths: dict[str, str] = field(default_factory=dict)  # recipe key -> spec path


@dataclass
class _Axes:
    """The checked axes, as every later step reads them."""

    sizes: dict[str, SizeEntry]  # grid.size by name
    recipe: dict[str, list[Any]]  # grid.recipe axes, values coerced
    base: dict[str, Any]  # the spec's recipe section: the fields it sets

    def base_value(self, key: str) -> Any:
        return self.base.get(key, _recipe_default(key))


def _expand(spec: StudySpec, *, for_run: bool = False) -> list[Cell]:
    check_grid_size(spec.grid, spec.grid.max_cells, spec.source)
    problems = _Problems(spec.source)
    sizes = _check_model_axes(spec.grid, spec.data_info, problems)
    recipe_axes = _check_recipe_axes(spec.grid, problems)
    problems.raise_if_any()
    axes = _Axes(sizes, recipe_axes, spec.recipe.model_dump(exclude_unset=True))

    drafts = _product(spec.grid, axes, problems)
    drafts += _includes(spec.grid, spec.data_info, axes, problems)
    problems.raise_if_any()
    if not drafts:
        problems.add("grid", "no cells: give grid.size and grid.patch (or grid.include), and check grid.exclude")
        problems.raise_if_any()

    named = _name_drafts(spec.grid, axes, drafts, problems)
    problems.raise_if_any()
    by_size = _size_overrides(spec.resources, drafts, problems)
    problems.raise_if_any()

    eval_cfg = _resolve_eval(spec, problems, for_run=for_run)
    cells = [_build_cell(spec, axes, name, d, by_size, eval_cfg, problems) for name, d in named]
    problems.raise_if_any()
    return [c for c in cells if c is not None]


# ------------------------------------------------------------------------------- 1. the axes


def _check_model_axes(grid: Grid, data: DataInfo, problems: _Problems) -> dict[str, SizeEntry]:
    """Sizes, patches and blocks, each checked on its own so the error names the axis entry."""
    latent = data.latent_size
    if not grid.size and grid.patch:
        problems.add("grid.size", "required with grid.patch (the grid is their product)")
    if grid.size and not grid.patch:
        problems.add("grid.patch", "required with grid.size (the grid is their product)")
    sizes: dict[str, SizeEntry] = {}
    for i, s in enumerate(grid.size):
        if s.name in sizes:
            problems.add(f"grid.size[{i}]", f"size {s.name!r} is listed twice")
        sizes[s.name] = s
        _check_dims(problems, f"grid.size[{i}]", s, data)
    for i in _repeats(grid.patch):
        problems.add(f"grid.patch[{i}]", f"patch {grid.patch[i]} is listed twice")
    for i, p in enumerate(grid.patch):
        if latent % p:
            problems.add(
                f"grid.patch[{i}]",
                f"{p} does not divide the latent size {latent} ({data.image_size} px / {data.vae_factor}); "
                f"use a divisor of {latent}",
            )
    for i in _repeats(grid.block):
        problems.add(f"grid.block[{i}]", f"block {grid.block[i]!r} is listed twice")
    return sizes


def _check_recipe_axes(grid: Grid, problems: _Problems) -> dict[str, list[Any]]:
    """grid.recipe: recipe fields only, each value as TrainConfig will see it, none twice."""
    axes: dict[str, list[Any]] = {}
    for key, values in grid.recipe.items():
        if key not in RECIPE_FIELDS:
            hint = "use grid.size/grid.patch/grid.block/data.manifest/eval" if key in CELL_FIELDS else f"allowed: {', '.join(RECIPE_FIELDS)}"
            problems.add(f"grid.recipe.{key}", f"not a recipe field; {hint}")
            continue
        if not values:
            problems.add(f"grid.recipe.{key}", "needs at least one value")
        coerced = []
        for j, v in enumerate(values):
            try:
                coerced.append(_coerce_recipe(key, v))
            except ValidationError as err:
                for e in err.errors():
                    problems.add(f"grid.recipe.{key}[{j}]", _msg(e))
        for j in _repeats(coerced):
            problems.add(f"grid.recipe.{key}[{j}]", f"value {coerced[j]!r} is listed twice")
        axes[key] = coerced
    return axes


def _repeats(values: Sequence[Any]) -> list[int]:
    """Indices of values equal to an earlier one, in linear time for hashable values (an axis
    may be as long as grid.max_cells, where comparing each value with all earlier ones is not)."""
    seen: set[Any] = set()
    unhashable: list[Any] = []
    out = []
    for i, v in enumerate(values):
        try:
            repeat = v in seen
            seen.add(v)
        except TypeError:  # a list or mapping value: compared the slow way, and rare
            repeat = v in unhashable
            unhashable.append(v)
        if repeat:
            out.append(i)
    return out


def _check_dims(problems: _Problems, where: str, size: SizeEntry, data: DataInfo) -> None:
    try:
        model_config(
            {**size.dims(), "patch_size": 1},
            input_size=data.latent_size,
            in_channels=data.channels,
            num_classes=data.num_classes,
        )
    except ConfigError as err:
        problems.add(where, str(err).replace("model.", ""))


# --------------------------------------------------------------- 2. product, exclude, include


def _product(grid: Grid, axes: _Axes, problems: _Problems) -> list[_Draft]:
    """Every combination of the axes, minus those matching a grid.exclude entry."""
    excludes = [_normalize_partial(problems, f"grid.exclude[{i}]", e, axes.sizes, require=False)
                for i, e in enumerate(grid.exclude)]
    drafts: list[_Draft] = []
    keys = list(axes.recipe)
    for size, patch, block, *combo in itertools.product(grid.size, grid.patch, grid.block, *axes.recipe.values()):
        recipe = dict(zip(keys, combo))
        d = _Draft(size, patch, block, recipe, "grid", {k: f"grid.recipe.{k}" for k in keys})
        if not any(ex is not None and _matches(ex, d, axes.base_value) for ex in excludes):
            drafts.append(d)
    return drafts


def _includes(grid: Grid, data: DataInfo, axes: _Axes, problems: _Problems) -> list[_Draft]:
    """The grid.include cells; an axis an entry leaves out takes the axis' first value."""
    drafts: list[_Draft] = []
    for i, inc in enumerate(grid.include):
        where = f"grid.include[{i}]"
        norm = _normalize_partial(problems, where, inc, axes.sizes, require=True)
        if norm is None:
            continue
        size = norm.pop("size")
        if size.name in axes.sizes and size is not axes.sizes[size.name]:
            if size.dims() != axes.sizes[size.name].dims():
                problems.add(f"{where}.size", f"{size.name!r} differs from the grid.size entry of that name")
            size = axes.sizes[size.name]
        elif size.name not in axes.sizes:
            _check_dims(problems, f"{where}.size", size, data)
        patch = norm.pop("patch")
        if data.latent_size % patch:
            problems.add(f"{where}.patch", f"{patch} does not divide the latent size {data.latent_size}")
        block = norm.pop("block", grid.block[0])
        recipe = {k: v[0] for k, v in axes.recipe.items()}
        recipe.update(norm)
        paths = {k: f"grid.recipe.{k}" for k in axes.recipe}
        paths.update({k: f"{where}.{k}" for k in norm})
        drafts.append(_Draft(size, patch, block, recipe, where, paths))
    return drafts


def _normalize_partial(
    problems: _Problems, where: str, entry: Any, sizes: Mapping[str, SizeEntry], *, require: bool
) -> dict[str, Any] | None:
    """An include/exclude entry with each value as the cell holds it; None after an error."""
    if not isinstance(entry, dict):
        problems.add(where, "expected a mapping of axis values, e.g. {size: S, patch: 2}")
        return None
    out: dict[str, Any] = {}
    ok = True
    for key, value in entry.items():
        try:
            out[key] = _partial_value(key, value, sizes)
        except ValidationError as err:
            ok = False
            for e in err.errors():
                problems.add(_join(f"{where}.{key}", e["loc"] if key == "size" else ()), _msg(e))
        except ValueError as err:
            ok = False
            problems.add(f"{where}.{key}", str(err))
    if require:
        for key in ("size", "patch"):
            if key not in entry:
                ok = False
                problems.add(f"{where}.{key}", "required in an include entry")
    return out if ok else None


def _partial_value(key: str, value: Any, sizes: Mapping[str, SizeEntry]) -> Any:
    """One include/exclude value as the cell holds it; ValueError / ValidationError if bad."""
    if key == "size":
        if isinstance(value, str) and value.removeprefix("DiT-") in sizes:
            return sizes[value.removeprefix("DiT-")]
        return SizeEntry.model_validate(value)
    if key == "patch":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"patch must be a positive integer, got {value!r}")
        return value
    if key == "block":
        if value not in BLOCKS:
            raise ValueError(f"unknown block {value!r}; choose one of {list(BLOCKS)}")
        return value
    if key in RECIPE_FIELDS:
        return _coerce_recipe(key, value)
    raise ValueError(f"unknown axis; use size, patch, block or a recipe field ({', '.join(RECIPE_FIELDS)})")


def _matches(partial: Mapping[str, Any], d: _Draft, base_value: Callable[[str], Any]) -> bool:
    for key, value in partial.items():
        if key == "size":
            if value.name != d.size.name:
                return False
        elif key == "patch":
            if value != d.patch:
                return False
        elif key == "block":
            if value != d.block:
                return False
        elif d.recipe.get(key, base_value(key)) != value:
            return False
    return True


# ------------------------------------------------------------------------ 3. names, 4. by_size


def _name_drafts(grid: Grid, axes: _Axes, drafts: Sequence[_Draft], problems: _Problems) -> list[tuple[str, _Draft]]:
    block_varies = len(grid.block) > 1
    named: list[tuple[str, _Draft]] = []
    seen: dict[str, str] = {}
    for d in drafts:
        name = cell_name(d.size, d.patch, d.block, d.recipe, block_varies=block_varies, axes=axes.recipe,
                         base_value=axes.base_value)
        if name in seen:
            problems.add(d.origin if d.origin != "grid" else "grid", f"duplicate cell name {name!r} (also from {seen[name]})")
        seen.setdefault(name, d.origin)
        named.append((name, d))
    return named


def _size_overrides(res: Resources, drafts: Sequence[_Draft], problems: _Problems) -> dict[str, SizeResources]:  # type: ignore[valid-type]
    """resources.by_size keyed by size name ('DiT-XL' -> 'XL'); every key must name a size."""
    known_sizes = set(SIZES) | {d.size.name for d in drafts}
    by_size: dict[str, SizeResources] = {}  # type: ignore[valid-type]
    for key, override in res.by_size.items():
        name = key.removeprefix("DiT-")
        if name not in known_sizes:
            problems.add(f"resources.by_size.{key}", f"unknown size; sizes: {', '.join(sorted(known_sizes))}")
        by_size[name] = override
    return by_size


# -------------------------------------------------------------------------------- 5. the cells


def _build_cell(
    spec: StudySpec,
    axes: _Axes,
    name: str,
    d: _Draft,
    by_size: Mapping[str, SizeResources],  # type: ignore[valid-type]
    eval_cfg: dict[str, Any],
    problems: _Problems,
) -> Cell | None:
    """The cell with its TrainConfig and TrialConfig checked; None (and problems) if either fails."""
    data = spec.data_info
    merged = {**axes.base, **d.recipe, "model": d.size.model(d.patch), "block": d.block, "data": data.manifest,
              "eval": eval_cfg}
    try:
        train = TrainConfig.model_validate(merged)
    except ValidationError as err:
        for e in err.errors():
            problems.add(_train_error_path(e["loc"], d), f"{_msg(e)} (cell {name})")
        return None
    res = spec.resources
    override = by_size.get(d.size.name)
    cell = Cell(
        name=name,
        model=d.size.model(d.patch),
        block=d.block,
        train=train,
        resources=res.with_override(override),
        axes={"size": d.size.name, "patch": d.patch, "block": d.block, **d.recipe},
        size=d.size.name,
        patch_size=d.patch,
        data=data,
        max_failures=res.max_failures,
        keep_checkpoints=res.keep_checkpoints,
        gpu_hour_tflops=spec.cost.gpu_hour_tflops,
    )
    try:
        cell.model_config()
        cell.trial_config(spec.storage)
    except ConfigError as err:
        problems.add(d.origin, f"cell {name}: {err}")
        return None
    except ValidationError as err:
        where = f"resources.by_size.{d.size.name}" if override is not None else "resources"
        for e in err.errors():
            problems.add(where, f"cell {name}: {_msg(e)}")
        return None
    return cell


def _train_error_path(loc: Sequence[Any], d: _Draft) -> str:
    """The spec field a TrainConfig error comes from: an axis entry, a grid axis or the recipe."""
    key = loc[0] if loc else None
    if key in d.recipe:
        return _join(d.origin_paths[key], loc[1:])
    if key == "model":
        return "grid.size"
    if key == "block":
        return "grid.block"
    if key == "data":
        return "data.manifest"
    if key == "eval":
        return _join("eval", loc[1:])
    if key is not None:
        return _loc(["recipe", *loc])
    return d.origin


def _resolve_eval(spec: StudySpec, problems: _Problems, *, for_run: bool) -> dict[str, Any]:
    """The eval section as every cell's TrainConfig gets it: local paths made absolute against
    the spec's folder; with evaluation on and the data present, the extractor must be available."""
    ev = spec.eval.model_dump()
    base = spec._base_dir or Path.cwd()
    for key in ("reference", "feature_weights"):
        value = ev.get(key)
        if value and not _is_remote(value):
            ev[key] = os.path.normpath(os.path.join(base, os.path.expanduser(value.removeprefix("file://"))))
    if spec.eval.enabled and spec.data_info.exists:
        _check_extractor(spec, ev, problems, for_run=for_run)
        ref = ev.get("reference")
        if ref and not _is_remote(ref) and not os.path.exists(ref):
            problems.add("eval.reference", f"{ref} does not exist (an ADM-style .npz or a latent manifest)")
        problems.raise_if_any()
    return ev


def _check_extractor(spec: StudySpec, ev: dict[str, Any], problems: _Problems, *, for_run: bool) -> None:
    """The extractor's files and imports; a 'package.module:factory' only for a run, since
    importing it runs the module's code, which a command that only reads the spec must not."""
    from dit.evaluate.features import canonical_name, check_extractor
    from dit.latents import Manifest

    if ":" in canonical_name(ev["features"]) and not for_run:
        return
    try:
        check_extractor(ev["features"], manifest=Manifest.load(spec.data_info.manifest), weights=ev["feature_weights"])
    except ConfigError as err:
        problems.add("eval.features", str(err))
