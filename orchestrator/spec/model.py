"""The spec's schema: :class:`StudySpec` and its sections (pydantic, unknown fields are errors).

The data section is in :mod:`orchestrator.spec.data`, the resources section in
:mod:`orchestrator.spec.resources`, the recipe in :mod:`orchestrator.spec.recipe`. A
``StudySpec`` is made by ``load_spec`` / ``parse_spec`` (:mod:`orchestrator.spec.load`),
which also resolve its data and expand its cells.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from dit.errors import ConfigError
from dit.evaluate import EvalConfig
from dit.models import BLOCKS, SIZES
from orchestrator.spec.base import NAME_PATTERN, _as_list, _Strict
from orchestrator.spec.cells import Cell
from orchestrator.spec.data import DataInfo, DataSpec
from orchestrator.spec.limits import DEFAULT_MAX_CELLS
from orchestrator.spec.recipe import Recipe
from orchestrator.spec.resources import Resources

DEFAULT_BLOCK = "adaln-zero"


class SizeEntry(_Strict):
    """A model size: a built-in name (S, B, L, XL) or a custom {name, depth, hidden_size, num_heads}."""

    name: str = Field(..., pattern=NAME_PATTERN, max_length=40)
    # Upper bounds far past any DiT (XL: 28, 1152, 16, 4.0) so that an absurd size is refused
    # here, not by a torch error or an endless build when its Gflops are measured.
    depth: int | None = Field(None, ge=1, le=1024)
    hidden_size: int | None = Field(None, ge=1, le=65536)
    num_heads: int | None = Field(None, ge=1, le=1024)
    mlp_ratio: float | None = Field(None, gt=0, le=64)

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
    max_cells: int = Field(
        DEFAULT_MAX_CELLS, ge=1,
        description=f"refuse a grid of more cells than this (default {DEFAULT_MAX_CELLS:,}), counted before any "
        "is made: the product of the axis lengths (before exclude) plus include. A guard against an axis typo "
        "expanding to millions of trials; raise it for a study meant to be larger",
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

    model_config = ConfigDict(allow_inf_nan=False)  # merged with EvalConfig's: "1e999" is no cfg_scale


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
        # A guard, not part of the study: raising it must not make a study folder see another spec
        # (its hash is of this dict), and specs written before it existed keep their hash.
        del out["spec"]["grid"]["max_cells"]
        if costs:
            out["total"] = {
                "cells": len(cells),
                "compute_gflops": sum(c.compute_gflops for c in cells),
                "gpu_hours": sum(c.gpu_hours for c in cells),
                "gpu_hour_tflops": self.cost.gpu_hour_tflops,
            }
        return out
