"""Study specs: one YAML file describes a whole model x patch (x block x recipe) grid.

A spec is read with ``yaml.safe_load``, validated with pydantic (unknown fields are errors
everywhere) and expanded into :class:`Cell` s, one per trial. Each cell carries a fully built
``dit.train.TrainConfig``, so the recipe's field rules live in one place (the trainer's own
config) and a spec that loads is a spec whose every trial would start. Every problem is a
``ConfigError`` whose lines read ``FILE: field.path: message``.

Minimal spec (see ``studies/*.yaml`` and ``ditscale schema`` for every field)::

    name: my-study
    data:
      manifest: ../data/in256/manifest.json   # relative to this file's folder
    grid:
      size: [S, B, {name: tiny, depth: 2, hidden_size: 64, num_heads: 4}]
      patch: [2, 4]
      block: [adaln-zero]                      # default
      recipe: {lr: [1.0e-4, 3.0e-4]}           # any TrainConfig field as an axis
      include: [{size: XL, patch: 2}]          # extra cells (missing axes: first value)
      exclude: [{size: B, patch: 2}]           # drop product cells matching all given keys
    recipe: {steps: 400000, global_batch: 256, precision: bf16}
    resources: {workers: 1, use_gpu: true, by_size: {XL: {workers: 8}}}

Cell names: ``DiT-<size>-<patch>`` plus, in axis order, the block when the block axis has
several values or is not ``adaln-zero``, and each recipe axis ``<key><value>`` when the axis
has several values or differs from the base recipe: ``DiT-S-2``, ``DiT-S-2-adaln-lr3e-4``.
Names depend only on a cell's own values and the axis declarations, never on which other
cells exist, so adding an ``include`` or ``exclude`` never renames (and so never orphans)
an existing trial.

Cost: ``gflops`` is the forward pass at batch 1 in fvcore's convention (one multiply-add =
one flop), as in the paper; training compute = Gflops x global_batch x steps x 3 (the
paper's). GPU-hours convert that to hardware FLOPs (x2: a multiply-add is two FLOPs) at
``cost.gpu_hour_tflops`` sustained TFLOP/s per GPU and assume perfect scaling over workers.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from dit.errors import ConfigError
from dit.evaluate import EvalConfig
from dit.models import BLOCKS, SIZES, DiTConfig
from dit.train import TrainConfig, resolve_model

if TYPE_CHECKING:
    from orchestrator.trial import TrialConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
DEFAULT_BLOCK = "adaln-zero"
FLOPS_PER_MAC = 2  # hardware FLOPs per multiply-add (fvcore counts one)
# TrainConfig fields a spec sets elsewhere: grid.size/grid.patch -> model, grid.block, data.manifest,
# and the top-level eval section.
CELL_FIELDS = ("model", "block", "data", "eval")
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


# --------------------------------------------------------------------------------------------
# The recipe: TrainConfig's own fields (constraints and defaults copied, not restated)
# --------------------------------------------------------------------------------------------


def _recipe_model() -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if name in CELL_FIELDS:
            continue
        info = copy.copy(info)
        annotation = info.annotation
        if info.default is PydanticUndefined and info.default_factory is None:
            # Required by TrainConfig (steps): may come from a grid.recipe axis instead.
            info.default = None
            annotation = Optional[annotation]
            info.description = (info.description + "; " if info.description else "") + (
                "required here or as a grid.recipe axis"
            )
        fields[name] = (annotation, info)
    return create_model(
        "Recipe",
        __config__=ConfigDict(extra="forbid"),
        __doc__="dit.train.TrainConfig fields except model/block/data; unset fields keep its defaults.",
        **fields,
    )


Recipe = _recipe_model()
RECIPE_FIELDS = tuple(Recipe.model_fields)


def _recipe_default(key: str) -> Any:
    default = TrainConfig.model_fields[key].default
    return None if default is PydanticUndefined else default


# --------------------------------------------------------------------------------------------
# Spec sections
# --------------------------------------------------------------------------------------------


class LatentSpec(_Strict):
    """The latent shape, for dry runs before the manifest exists (read from it otherwise)."""

    channels: int = Field(..., ge=1, description="latent channels (4 for the SD VAE, 1-3 for pixels)")
    size: int = Field(..., ge=1, description="latent side (32 for 256 px through the SD VAE)")
    vae_factor: int | None = Field(
        None, ge=1, description="pixels per latent cell (8 for the SD VAE, 1 for pixels); default image_size / size"
    )


class DataSpec(_Strict):
    manifest: str = Field(
        ..., min_length=1,
        description="latent manifest from `ditscale prepare` (path or fsspec URL); relative paths resolve "
        "against the spec file's folder",
    )
    image_size: int | None = Field(None, ge=1, description="pixels; read from the manifest when it exists")
    num_classes: int | None = Field(None, ge=0, description="classes; read from the manifest when it exists")
    latent: LatentSpec | None = Field(None, description="latent shape; read from the manifest when it exists")
    builtin: Literal["digits"] | None = Field(
        None, description="a built-in data set that `ditscale run` prepares into `manifest` (at image_size, "
        "pixels as latents) when the manifest does not exist yet",
    )


class SizeEntry(_Strict):
    """A model size: a built-in name (S, B, L, XL) or a custom {name, depth, hidden_size, num_heads}."""

    name: str = Field(..., pattern=NAME_PATTERN, max_length=40)
    depth: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value.removeprefix("DiT-")}
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return {**value, "name": value["name"].removeprefix("DiT-")}
        return value

    @model_validator(mode="after")
    def _check(self) -> SizeEntry:
        dims = (self.depth, self.hidden_size, self.num_heads)
        if all(d is None for d in dims):
            if self.name not in SIZES:
                raise ValueError(
                    f"unknown model size {self.name!r}; use one of {', '.join(SIZES)} or a custom entry "
                    "{name, depth, hidden_size, num_heads}"
                )
        elif any(d is None for d in dims):
            raise ValueError(f"custom size {self.name!r} needs all of depth, hidden_size and num_heads")
        elif self.name in SIZES and dims != SIZES[self.name]:
            raise ValueError(
                f"{self.name!r} is the built-in size {SIZES[self.name]} (depth, hidden_size, num_heads); "
                "give the custom size another name"
            )
        return self

    @property
    def builtin(self) -> bool:
        return self.name in SIZES and self.mlp_ratio is None

    def dims(self) -> dict[str, Any]:
        depth, hidden, heads = SIZES[self.name] if self.depth is None else (self.depth, self.hidden_size, self.num_heads)
        out: dict[str, Any] = {"depth": depth, "hidden_size": hidden, "num_heads": heads}
        if self.mlp_ratio is not None:
            out["mlp_ratio"] = self.mlp_ratio
        return out

    def model(self, patch: int) -> str | dict[str, Any]:
        """What TrainConfig.model gets: 'DiT-S/2', or a custom dict."""
        return f"DiT-{self.name}/{patch}" if self.builtin else {**self.dims(), "patch_size": patch}

    def as_value(self) -> str | dict[str, Any]:
        return self.name if self.depth is None and self.mlp_ratio is None else self.model_dump(exclude_none=True)


class Grid(_Strict):
    """The axes whose product is the study (then ``exclude``, then ``include``)."""

    size: list[SizeEntry] = Field(
        default_factory=list, description="model sizes: S, B, L, XL or custom {name, depth, hidden_size, num_heads}"
    )
    patch: list[int] = Field(default_factory=list, description="patch sizes, e.g. [2, 4, 8]")
    block: list[Literal[BLOCKS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [DEFAULT_BLOCK], min_length=1, description="conditioning designs"
    )
    recipe: dict[str, list[Any]] = Field(
        default_factory=dict, description="recipe fields as axes, e.g. {lr: [1.0e-4, 3.0e-4]}"
    )
    include: list[dict[str, Any]] = Field(
        default_factory=list,
        description="extra cells as {size, patch, block?, <recipe field>?}; missing axes take the axis' first value",
    )
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="partial cells; a product cell matching all given keys is dropped"
    )

    @field_validator("size", "patch", "block", mode="before")
    @classmethod
    def _scalar_to_list(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("patch")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        for p in value:
            if p < 1:
                raise ValueError(f"patch sizes must be >= 1, got {p}")
        return value

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _as_list(v) for k, v in value.items()}
        return value


class EvalSpec(EvalConfig):
    """In-loop evaluation (FID), off by default: every cell's ``TrainConfig.eval``.

    The fields are ``dit.evaluate.EvalConfig``'s. ``reference`` and ``feature_weights`` may be
    relative to the spec file's folder. When the manifest exists, a spec with evaluation on
    loads only if its feature extractor is available (weights file, packages).
    """


class WorkerResources(_Strict):
    workers: int = Field(1, ge=1, description="Ray Train workers (processes) per trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0)


class SizeResources(_Strict):
    workers: int | None = Field(None, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)
    use_gpu: bool | None = None
    gpus_per_worker: float | None = Field(None, ge=0)


class Resources(WorkerResources):
    by_size: dict[str, SizeResources] = Field(
        default_factory=dict, description="overrides by model size, e.g. {XL: {workers: 8}, L: {workers: 4}}"
    )
    max_failures: int = Field(2, ge=0, description="worker-group restarts per trial")
    keep_checkpoints: int = Field(2, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: derived by the runner")


class Tracking(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (default: MLflow's own default)")
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment (default: the study name)")


class Cost(_Strict):
    gpu_hour_tflops: float = Field(
        400.0, gt=0,
        description="sustained hardware TFLOP/s per GPU for GPU-hour estimates. Default 400: an H100 "
        "(989 dense bf16 TFLOP/s) at ~40 % MFU, reachable by the L/XL models; small ones get less",
    )


class StudySpec(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN, max_length=100, description="study name: MLflow experiment and folder")
    description: str | None = None
    data: DataSpec
    grid: Grid
    recipe: Recipe = Field(default_factory=Recipe)  # type: ignore[valid-type]
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)
    storage: str = Field("runs", min_length=1, description="trial storage folder or URI; relative = the runner's CWD")
    cost: Cost = Field(default_factory=Cost)

    _source: str = PrivateAttr("spec")
    _base_dir: Path | None = PrivateAttr(None)
    _data: DataInfo | None = PrivateAttr(None)
    _cells: list[Cell] | None = PrivateAttr(None)

    @property
    def source(self) -> str:
        """The file this spec came from (or 'spec')."""
        return self._source

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def data_info(self) -> DataInfo:
        assert self._data is not None, "use load_spec / parse_spec"
        return self._data

    def check_data(self) -> None:
        """ConfigError unless the manifest exists (a dry run does not need it; a run does)."""
        info = self.data_info
        if not info.exists:
            from dit.latents import Manifest

            try:
                Manifest.load(info.manifest)
            except ConfigError as err:
                raise ConfigError(f"{self._source}: data.manifest: {err}") from None

    def cells(self) -> list[Cell]:
        """One cell per trial, in spec order (the product, then ``include``)."""
        assert self._cells is not None, "use load_spec / parse_spec"
        return list(self._cells)

    def resolved(self, costs: bool = True) -> dict[str, Any]:
        """The whole spec with every cell expanded, JSON-able (logged as an MLflow artifact)."""
        cells = self.cells()
        out: dict[str, Any] = {
            "format": "ditscale-study",
            "format_version": 1,
            "source": self._source,
            "name": self.name,
            "experiment": self.experiment,
            "spec": self.model_dump(mode="json"),
            "data": asdict(self.data_info),
            "cells": [c.to_dict(costs=costs) for c in cells],
        }
        out["spec"]["recipe"] = self.recipe.model_dump(mode="json", exclude_unset=True)
        if costs:
            out["total"] = {
                "cells": len(cells),
                "compute_gflops": sum(c.compute_gflops for c in cells),
                "gpu_hours": sum(c.gpu_hours for c in cells),
                "gpu_hour_tflops": self.cost.gpu_hour_tflops,
            }
        return out


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataInfo:
    manifest: str  # resolved path or URL: what TrainConfig.data gets
    exists: bool  # False: dry run only (shape from data.latent)
    image_size: int
    channels: int
    latent_size: int
    vae_factor: int
    num_classes: int


@cache
def _measure(cfg: DiTConfig) -> tuple[float, int]:
    from dit.flops import measure

    report = measure(cfg, input_size=cfg.input_size)  # builds on the meta device: fast
    return report.gflops, report.params


@dataclass(frozen=True)
class Cell:
    """One trial of a study: a model, a block, a full recipe and its resources."""

    name: str
    model: str | dict[str, Any]
    block: str
    train: TrainConfig
    workers: int
    cpus_per_worker: float
    use_gpu: bool
    gpus_per_worker: float
    axes: dict[str, Any]  # size, patch, block and the recipe axes: the values that define the cell
    size: str
    patch_size: int
    data: DataInfo
    max_failures: int = 2
    keep_checkpoints: int = 2
    gpu_hour_tflops: float = 400.0

    def model_config(self) -> DiTConfig:
        """The DiTConfig the trainer will build (data shape and classes filled in)."""
        d = self.data
        manifest = SimpleNamespace(latent_shape=(d.channels, d.latent_size, d.latent_size), num_classes=d.num_classes)
        return resolve_model(self.train, manifest)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def tokens(self) -> int:
        return self.model_config().num_tokens

    @property
    def gflops(self) -> float:
        """Forward Gflops at batch 1 (fvcore; cached per model config)."""
        return _measure(self.model_config())[0]

    @property
    def params(self) -> int:
        return _measure(self.model_config())[1]

    @property
    def compute_gflops(self) -> float:
        """Training compute, the paper's way: Gflops x global_batch x steps x 3."""
        return self.gflops * self.train.global_batch * self.train.steps * 3

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker if self.use_gpu else 0.0

    @property
    def gpu_hours(self) -> float:
        """Estimated GPU-hours at ``cost.gpu_hour_tflops`` (perfect scaling over workers)."""
        return self.compute_gflops * 1e9 * FLOPS_PER_MAC / (self.gpu_hour_tflops * 1e12) / 3600

    @property
    def wall_hours(self) -> float:
        """gpu_hours spread over the trial's GPUs (or workers, on CPU)."""
        return self.gpu_hours / max(self.gpus or self.workers, 1e-9)

    def trial_config(self, storage: str) -> TrialConfig:
        from orchestrator.trial import TrialConfig

        return TrialConfig(
            name=self.name,
            train=self.train,
            workers=self.workers,
            use_gpu=self.use_gpu,
            cpus_per_worker=self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker,
            storage=storage,
            max_failures=self.max_failures,
            keep_checkpoints=self.keep_checkpoints,
        )

    def to_dict(self, costs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "model": copy.deepcopy(self.model),
            "size": self.size,
            "patch_size": self.patch_size,
            "block": self.block,
            "axes": dict(self.axes),
            "workers": self.workers,
            "cpus_per_worker": self.cpus_per_worker,
            "use_gpu": self.use_gpu,
            "gpus_per_worker": self.gpus_per_worker,
            "train": self.train.model_dump(mode="json"),
            "model_config": self.model_config().to_dict(),
        }
        if costs:
            out.update(
                tokens=self.tokens,
                gflops=self.gflops,
                params=self.params,
                compute_gflops=self.compute_gflops,
                gpu_hours=self.gpu_hours,
            )
        return out


def order_by_cost(cells: Iterable[Cell]) -> list[Cell]:
    """Longest trial first (estimated wall time = GPU-hours / the trial's GPUs, or / workers
    on CPU); ties by training compute, then spec order (stable).

    The runner launches trials in this order (list scheduling, longest-processing-time
    rule): the long trials start early and the short ones fill the gaps at the end. Ordering
    by total compute alone is worse when sizes get different GPU counts (a 4-GPU DiT-L/2
    runs longer than an 8-GPU DiT-XL/2): see ``benchmarks/bench_schedule.py``.
    """
    return sorted(cells, key=lambda c: (-c.wall_hours, -c.compute_gflops))


# --------------------------------------------------------------------------------------------
# Loading and expansion
# --------------------------------------------------------------------------------------------


def _loc(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _join(base: str, loc: Sequence[Any]) -> str:
    for p in loc:
        base += f"[{p}]" if isinstance(p, int) else f".{p}"
    return base


def _msg(e: Mapping[str, Any]) -> str:
    return str(e["msg"]).removeprefix("Value error, ")


def _errors(err: ValidationError, prefix: Sequence[Any] = ()) -> list[str]:
    return [f"{_loc([*prefix, *e['loc']])}: {_msg(e)}" for e in err.errors()]


class _Problems:
    def __init__(self, source: str):
        self.source, self.lines = source, []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(f"{self.source}: {line}" for line in dict.fromkeys(self.lines)))


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read, validate and expand a study spec; any problem is a ConfigError naming the field."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read study spec: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not a text file ({err.reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}".rstrip()) from None
    return parse_spec(raw, source=source, base_dir=path.resolve().parent)


def parse_spec(raw: Any, *, source: str = "spec", base_dir: str | os.PathLike[str] | None = None) -> StudySpec:
    """Validate and expand an already-parsed spec (``base_dir``: where relative manifests live)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping with name, data, grid, recipe, ...")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n".join(f"{source}: {line}" for line in _errors(err))) from None
    spec._source = source
    spec._base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    spec._data = _resolve_data(spec, spec._base_dir)
    spec._cells = _expand(spec)
    return spec


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _resolve_data(spec: StudySpec, base_dir: Path) -> DataInfo:
    problems = _Problems(spec.source)
    d = spec.data
    url = d.manifest
    if not _is_remote(url):
        local = os.path.expanduser(url.removeprefix("file://"))
        url = os.path.normpath(os.path.join(base_dir, local))
        exists = os.path.exists(url)
    else:
        exists = d.latent is None  # remote: read only when the spec does not give the shape
    if exists:
        from dit.latents import Manifest

        try:
            m = Manifest.load(url)
        except ConfigError as err:
            raise ConfigError(f"{spec.source}: data.manifest: {err}") from None
        if len(m.latent_shape) != 3 or m.latent_shape[1] != m.latent_shape[2]:
            problems.add("data.manifest", f"latents must be C x S x S, the manifest says {list(m.latent_shape)}")
            problems.raise_if_any()
        channels, size = m.latent_shape[0], m.latent_shape[1]
        found = {
            "data.image_size": (d.image_size, m.image_size),
            "data.num_classes": (d.num_classes, m.num_classes),
            "data.latent.channels": (d.latent and d.latent.channels, channels),
            "data.latent.size": (d.latent and d.latent.size, size),
        }
        for where, (given, actual) in found.items():
            if given is not None and given != actual:
                problems.add(where, f"{given} does not match the manifest's {actual} ({url})")
        image_size, num_classes = m.image_size, m.num_classes
        if d.latent and d.latent.vae_factor and d.latent.vae_factor * size != image_size:
            problems.add("data.latent.vae_factor", f"{d.latent.vae_factor} x latent {size} != image_size {image_size}")
    else:
        if d.latent is None or d.num_classes is None:
            missing = [k for k, v in (("data.latent", d.latent), ("data.num_classes", d.num_classes)) if v is None]
            problems.add(
                "data.manifest",
                f"{url} does not exist (yet); run `ditscale prepare ... --out DIR` first, or give "
                f"{' and '.join(missing)} for a dry run",
            )
            problems.raise_if_any()
        channels, size, num_classes = d.latent.channels, d.latent.size, d.num_classes
        factor = d.latent.vae_factor
        if d.image_size is None and factor is None:
            problems.add("data.image_size", "required when the manifest does not exist yet (or data.latent.vae_factor)")
            problems.raise_if_any()
        image_size = d.image_size if d.image_size is not None else factor * size
        if factor is not None and factor * size != image_size:
            problems.add("data.latent.vae_factor", f"{factor} x latent {size} != data.image_size {image_size}")
    problems.raise_if_any()
    if image_size % size:
        problems.add("data.image_size", f"{image_size} is not a multiple of the latent size {size}")
        problems.raise_if_any()
    return DataInfo(url, exists, image_size, channels, size, image_size // size, num_classes)


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


@dataclass
class _Draft:
    size: SizeEntry
    patch: int
    block: str
    recipe: dict[str, Any]  # axis values (coerced)
    origin: str  # "grid" or "grid.include[i]"
    origin_paths: dict[str, str] = field(default_factory=dict)  # recipe key -> spec path


def _coerce_recipe(key: str, value: Any) -> Any:
    """A recipe value as TrainConfig will see it ('1e-4' -> 0.0001); ValidationError if bad."""
    return getattr(Recipe.model_validate({key: value}), key)


def _expand(spec: StudySpec) -> list[Cell]:
    problems = _Problems(spec.source)
    data = spec.data_info
    grid = spec.grid
    latent = data.latent_size

    # Axes, each checked on its own so the error names the axis entry.
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
    for i, p in enumerate(grid.patch):
        if p in grid.patch[:i]:
            problems.add(f"grid.patch[{i}]", f"patch {p} is listed twice")
        if latent % p:
            problems.add(
                f"grid.patch[{i}]",
                f"{p} does not divide the latent size {latent} ({data.image_size} px / {data.vae_factor}); "
                f"use a divisor of {latent}",
            )
    for i, b in enumerate(grid.block):
        if b in grid.block[:i]:
            problems.add(f"grid.block[{i}]", f"block {b!r} is listed twice")
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
        for j, v in enumerate(coerced):
            if v in coerced[:j]:
                problems.add(f"grid.recipe.{key}[{j}]", f"value {v!r} is listed twice")
        axes[key] = coerced
    problems.raise_if_any()

    base = spec.recipe.model_dump(exclude_unset=True)

    def base_value(key: str) -> Any:
        return base.get(key, _recipe_default(key))

    # Product, minus exclude.
    excludes = [_normalize_partial(problems, f"grid.exclude[{i}]", e, sizes, require=False) for i, e in enumerate(grid.exclude)]
    drafts: list[_Draft] = []
    keys = list(axes)
    for size, patch, block, *combo in itertools.product(grid.size, grid.patch, grid.block, *axes.values()):
        recipe = dict(zip(keys, combo))
        d = _Draft(size, patch, block, recipe, "grid", {k: f"grid.recipe.{k}" for k in keys})
        if not any(ex is not None and _matches(ex, d, base_value) for ex in excludes):
            drafts.append(d)

    # Include: explicit extra cells.
    for i, inc in enumerate(grid.include):
        where = f"grid.include[{i}]"
        norm = _normalize_partial(problems, where, inc, sizes, require=True)
        if norm is None:
            continue
        size = norm.pop("size")
        if size.name in sizes and size is not sizes[size.name]:
            if size.dims() != sizes[size.name].dims():
                problems.add(f"{where}.size", f"{size.name!r} differs from the grid.size entry of that name")
            size = sizes[size.name]
        elif size.name not in sizes:
            _check_dims(problems, f"{where}.size", size, data)
        patch = norm.pop("patch")
        if latent % patch:
            problems.add(f"{where}.patch", f"{patch} does not divide the latent size {latent}")
        block = norm.pop("block", grid.block[0])
        recipe = {k: v[0] for k, v in axes.items()}
        recipe.update(norm)
        paths = {k: f"grid.recipe.{k}" for k in axes}
        paths.update({k: f"{where}.{k}" for k in norm})
        drafts.append(_Draft(size, patch, block, recipe, where, paths))
    problems.raise_if_any()
    if not drafts:
        problems.add("grid", "no cells: give grid.size and grid.patch (or grid.include), and check grid.exclude")
        problems.raise_if_any()

    # Names.
    block_varies = len(grid.block) > 1
    named: list[tuple[str, _Draft]] = []
    seen: dict[str, str] = {}
    for d in drafts:
        parts = [f"DiT-{_safe(d.size.name)}-{d.patch}"]
        if block_varies or d.block != DEFAULT_BLOCK:
            parts.append(d.block)
        for key, value in d.recipe.items():
            if len(axes.get(key, ())) > 1 or value != base_value(key):
                parts.append(_label(key, value))
        name = "-".join(parts)
        if name in seen:
            problems.add(d.origin if d.origin != "grid" else "grid", f"duplicate cell name {name!r} (also from {seen[name]})")
        seen.setdefault(name, d.origin)
        named.append((name, d))
    problems.raise_if_any()

    # Resources by size.
    res = spec.resources
    known_sizes = set(SIZES) | {d.size.name for d in drafts}
    by_size: dict[str, SizeResources] = {}
    for key, override in res.by_size.items():
        name = key.removeprefix("DiT-")
        if name not in known_sizes:
            problems.add(f"resources.by_size.{key}", f"unknown size; sizes: {', '.join(sorted(known_sizes))}")
        by_size[name] = override
    problems.raise_if_any()

    # Cells: a TrainConfig and a TrialConfig each (their validators are the rules).
    eval_cfg = _resolve_eval(spec, problems)
    cells: list[Cell] = []
    for name, d in named:
        merged = {**base, **d.recipe, "model": d.size.model(d.patch), "block": d.block, "data": data.manifest,
                  "eval": eval_cfg}
        try:
            train = TrainConfig.model_validate(merged)
        except ValidationError as err:
            for e in err.errors():
                key = e["loc"][0] if e["loc"] else None
                if key in d.recipe:
                    where = _join(d.origin_paths[key], e["loc"][1:])
                elif key == "model":
                    where = "grid.size"
                elif key == "block":
                    where = "grid.block"
                elif key == "data":
                    where = "data.manifest"
                elif key == "eval":
                    where = _join("eval", e["loc"][1:])
                elif key is not None:
                    where = _loc(["recipe", *e["loc"]])
                else:
                    where = d.origin
                problems.add(where, f"{_msg(e)} (cell {name})")
            continue
        values = {**res.model_dump(include=set(WorkerResources.model_fields))}
        override = by_size.get(d.size.name)
        if override is not None:
            values.update(override.model_dump(exclude_none=True))
        cell = Cell(
            name=name,
            model=d.size.model(d.patch),
            block=d.block,
            train=train,
            axes={"size": d.size.name, "patch": d.patch, "block": d.block, **d.recipe},
            size=d.size.name,
            patch_size=d.patch,
            data=data,
            max_failures=res.max_failures,
            keep_checkpoints=res.keep_checkpoints,
            gpu_hour_tflops=spec.cost.gpu_hour_tflops,
            **values,
        )
        try:
            cell.model_config()
            cell.trial_config(spec.storage)
        except ConfigError as err:
            problems.add(d.origin, f"cell {name}: {err}")
            continue
        except ValidationError as err:
            where = f"resources.by_size.{d.size.name}" if override is not None else "resources"
            for e in err.errors():
                problems.add(where, f"cell {name}: {_msg(e)}")
            continue
        cells.append(cell)
    problems.raise_if_any()
    return cells


def _resolve_eval(spec: StudySpec, problems: _Problems) -> dict[str, Any]:
    """The eval section as every cell's TrainConfig gets it: local paths made absolute against
    the spec's folder; with evaluation on and the data present, the extractor must be available."""
    ev = spec.eval.model_dump()
    base = spec._base_dir or Path.cwd()
    for key in ("reference", "feature_weights"):
        value = ev.get(key)
        if value and not _is_remote(value):
            ev[key] = os.path.normpath(os.path.join(base, os.path.expanduser(value.removeprefix("file://"))))
    if spec.eval.enabled and spec.data_info.exists:
        from dit.features import check_extractor
        from dit.latents import Manifest

        try:
            check_extractor(ev["features"], manifest=Manifest.load(spec.data_info.manifest), weights=ev["feature_weights"])
        except ConfigError as err:
            problems.add("eval.features", str(err))
        ref = ev.get("reference")
        if ref and not _is_remote(ref) and not os.path.exists(ref):
            problems.add("eval.reference", f"{ref} does not exist (an ADM-style .npz or a latent manifest)")
        problems.raise_if_any()
    return ev


def _check_dims(problems: _Problems, where: str, size: SizeEntry, data: DataInfo) -> None:
    from dit.models import model_config

    try:
        model_config(
            {**size.dims(), "patch_size": 1},
            input_size=data.latent_size,
            in_channels=data.channels,
            num_classes=data.num_classes,
        )
    except ConfigError as err:
        problems.add(where, str(err).replace("model.", ""))


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
            if key == "size":
                if isinstance(value, str) and value.removeprefix("DiT-") in sizes:
                    out[key] = sizes[value.removeprefix("DiT-")]
                else:
                    out[key] = SizeEntry.model_validate(value)
            elif key == "patch":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"patch must be a positive integer, got {value!r}")
                out[key] = value
            elif key == "block":
                if value not in BLOCKS:
                    raise ValueError(f"unknown block {value!r}; choose one of {list(BLOCKS)}")
                out[key] = value
            elif key in RECIPE_FIELDS:
                out[key] = _coerce_recipe(key, value)
            else:
                raise ValueError(f"unknown axis; use size, patch, block or a recipe field ({', '.join(RECIPE_FIELDS)})")
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


def _matches(partial: Mapping[str, Any], d: _Draft, base_value) -> bool:
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


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of a study spec (``ditscale schema``), for editor completion."""
    schema = StudySpec.model_json_schema()
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ditscale study spec",
        **{k: v for k, v in schema.items() if k != "title"},
    }
    # A size is also written as a bare name: S, B, L, XL.
    grid = schema["$defs"]["Grid"]["properties"]
    item = grid["size"]["items"]
    grid["size"]["items"] = {"anyOf": [{"type": "string", "enum": list(SIZES)}, item]}
    return schema
