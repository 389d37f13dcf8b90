"""Limits on a spec's size and shape, checked before anything is built from it.

A study spec is a few kilobytes and a few hundred values. Input far past that is a typo
(``lr: [...]`` with a thousand entries times ``seed: [...]`` with a thousand more), generated
input gone wrong or an attack (a YAML alias bomb: nine anchors, each nine aliases of the last,
stand for 9^9 values in a 1 KB file). Each limit is checked in time linear in the input as
written, before the step whose cost it bounds:

- the file: at most ``MAX_SPEC_BYTES`` read, nested at most ``MAX_DEPTH`` levels (:mod:`orchestrator.spec.yamlfile`);
- the parsed values: at most ``MAX_VALUES`` once aliases are expanded, no alias inside itself,
  integers within 64 bits, floats finite (:func:`check_values`, before validation);
- the grid: at most ``grid.max_cells`` cells, counted by multiplying the axis lengths before
  any cell is made (:func:`check_grid_size`).

Only ``grid.max_cells`` is a spec field: the others bound the input before the spec can be
read, and no legitimate spec comes near them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from dit.errors import ConfigError
from orchestrator.spec.problems import _join

MAX_SPEC_BYTES = 2**20
MAX_DEPTH = 64
MAX_VALUES = 1_000_000
MAX_INT = 2**63 - 1  # what torch, numpy and JSON consumers hold; no field needs more
DEFAULT_MAX_CELLS = 1000

_END = object()


def check_values(raw: Any, source: str) -> None:
    """ConfigError unless ``raw`` (parsed YAML/JSON) is within the value limits above.

    A walk over the distinct containers, each visited once with its expanded size remembered,
    so a structure that shares sub-lists (what YAML aliases make) costs what it holds, not
    what it expands to.
    """
    sizes: dict[int, int] = {}  # id(container) -> values it expands to (itself included)
    on_path: set[int] = set()
    stack: list[list[Any]] = []  # frames: [container, its (key, value) pairs, expanded size so far, path]

    def enter(node: Any, path: str) -> None:
        if len(stack) >= MAX_DEPTH:
            raise ConfigError(f"{source}: {path}: nested deeper than {MAX_DEPTH} levels")
        on_path.add(id(node))
        stack.append([node, _children(node), 1, path])

    def count(n: int) -> None:
        stack[-1][2] += n
        if stack[-1][2] > MAX_VALUES:
            raise ConfigError(
                f"{source}: {stack[-1][3] or '(top level)'}: expands to more than {MAX_VALUES:,} values (YAML "
                "aliases count once per use); a study spec holds a few hundred: is this an alias bomb?"
            )

    if not _is_container(raw):
        _check_scalar(raw, "(top level)", source)
        return
    enter(raw, "")
    while stack:
        node, children, total, path = stack[-1]
        key, child = next(children, (None, _END))
        if child is _END:
            stack.pop()
            on_path.discard(id(node))
            sizes[id(node)] = total
            if stack:
                count(total)
            continue
        _check_scalar(key, path or "(top level)", source)  # before the key goes into a message
        where = _join(path, [key]).lstrip(".")
        if not _is_container(child):
            _check_scalar(child, where, source)
            count(1)
        elif id(child) in sizes:
            count(sizes[id(child)])
        elif id(child) in on_path:
            raise ConfigError(f"{source}: {where}: refers to a value that contains it (a YAML alias inside its anchor)")
        else:
            enter(child, where)


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple))


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    return iter(node.items()) if isinstance(node, dict) else enumerate(node)


def _check_scalar(value: Any, where: str, source: str) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(f"{source}: {where}: integer out of range (more than 2^63 - 1); "
                          "no field takes one this large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {where}: {value} is not a finite number; no field takes inf or nan")


def check_grid_size(grid: Any, max_cells: int, source: str) -> None:
    """ConfigError if the grid would make more than ``max_cells`` cells: the product of the
    axis lengths (before ``grid.exclude``, which is applied to the product) plus
    ``grid.include``, and each axis, include and exclude list on its own (an axis longer than
    the limit is refused even when another axis is empty and the product is 0)."""
    axes = {"grid.size": len(grid.size), "grid.patch": len(grid.patch), "grid.block": len(grid.block),
            **{f"grid.recipe.{k}": len(v) for k, v in grid.recipe.items()}}
    lists = {**axes, "grid.include": len(grid.include), "grid.exclude": len(grid.exclude)}
    raise_hint = f"raise grid.max_cells (now {max_cells:,}) if the study is meant to be this large"
    for where, n in lists.items():
        if n > max_cells:
            raise ConfigError(f"{source}: {where}: {n:,} entries, more than grid.max_cells cells; {raise_hint}")
    product = math.prod(axes.values())
    total = product + len(grid.include)
    if total > max_cells:
        shape = " x ".join(f"{where} {n:,}" for where, n in axes.items())
        if grid.include:
            shape += f" + grid.include {len(grid.include):,}"
        raise ConfigError(
            f"{source}: grid: {total:,} cells ({shape}) exceed grid.max_cells = {max_cells:,}; {raise_hint}, "
            "or drop axis values"
        )
