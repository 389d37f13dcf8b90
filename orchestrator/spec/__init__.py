"""Study specs: one YAML file describes a whole model x patch (x block x recipe) grid.

A spec is read with a safe YAML loader, checked against size limits, validated with pydantic
(unknown fields are errors everywhere) and expanded into :class:`Cell` s, one per trial. Each
cell carries a fully built ``dit.train.TrainConfig``, so the recipe's field rules live in one
place (the trainer's own config) and a spec that loads is a spec whose every trial would start. Every problem is a
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
      max_cells: 1000                          # the default: a bigger grid is refused before expanding
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

Where things live (every name below is also importable from ``orchestrator.spec``):

- ``model``: the schema, :class:`StudySpec` and its sections (``SizeEntry``, ``Grid``, ``EvalSpec``,
  ``Tracking``, ``Cost``); ``data``: ``DataSpec``, ``LatentSpec`` and what they resolve to,
  :class:`DataInfo`; ``resources``: ``WorkerResources`` (the one declaration of workers, CPUs and
  GPUs), ``SizeResources``, ``Resources``; ``recipe``: ``Recipe`` (TrainConfig's fields).
- ``load``: ``load_spec`` / ``parse_spec`` (``for_run=True`` only where cells are about to run: it
  imports an ``eval.features: "module:factory"``); ``yamlfile``: reading a YAML file safely (size,
  depth); ``limits``: what an absurd spec is refused by before anything is built (values, nesting,
  ``grid.max_cells``); ``problems``: how errors are collected and worded; ``expand``: the grid
  expansion, step by step; ``names``: cell names.
- ``cells``: :class:`Cell` (one trial, its costs) and ``order_by_cost``; ``trial``: ``TrialConfig``
  (``ditscale train``'s YAML), ``load_trial_config``; ``schema``: ``spec_json_schema``.

Nothing here imports Ray or MLflow, nor the orchestrator modules that run studies.
"""

from __future__ import annotations

from dit.flops import FLOPS_PER_MAC
from orchestrator.spec.base import NAME_PATTERN
from orchestrator.spec.cells import Cell, order_by_cost
from orchestrator.spec.data import DataInfo, DataSpec, LatentSpec
from orchestrator.spec.load import load_spec, parse_spec
from orchestrator.spec.model import DEFAULT_BLOCK, Cost, EvalSpec, Grid, SizeEntry, StudySpec, Tracking
from orchestrator.spec.names import AXIS_LABELS
from orchestrator.spec.recipe import CELL_FIELDS, RECIPE_FIELDS, Recipe
from orchestrator.spec.resources import Resources, SizeResources, WorkerResources
from orchestrator.spec.schema import spec_json_schema
from orchestrator.spec.trial import TrialConfig, format_validation_error, load_trial_config

__all__ = [
    "AXIS_LABELS",
    "CELL_FIELDS",
    "DEFAULT_BLOCK",
    "FLOPS_PER_MAC",
    "NAME_PATTERN",
    "RECIPE_FIELDS",
    "Cell",
    "Cost",
    "DataInfo",
    "DataSpec",
    "EvalSpec",
    "Grid",
    "LatentSpec",
    "Recipe",
    "Resources",
    "SizeEntry",
    "SizeResources",
    "StudySpec",
    "Tracking",
    "TrialConfig",
    "WorkerResources",
    "format_validation_error",
    "load_spec",
    "load_trial_config",
    "order_by_cost",
    "parse_spec",
    "spec_json_schema",
]
