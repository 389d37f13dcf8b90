"""The recipe: TrainConfig's own fields (constraints and defaults copied, not restated)."""

from __future__ import annotations

import copy
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, create_model
from pydantic_core import PydanticUndefined

from dit.train import TrainConfig

# TrainConfig fields a spec sets elsewhere: grid.size/grid.patch -> model, grid.block, data.manifest,
# and the top-level eval section.
CELL_FIELDS = ("model", "block", "data", "eval")


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
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False),  # "1e999" would be lr = inf
        __doc__="dit.train.TrainConfig fields except model/block/data; unset fields keep its defaults.",
        **fields,
    )


Recipe = _recipe_model()
RECIPE_FIELDS = tuple(Recipe.model_fields)


def _recipe_default(key: str) -> Any:
    default = TrainConfig.model_fields[key].default
    return None if default is PydanticUndefined else default


def _coerce_recipe(key: str, value: Any) -> Any:
    """A recipe value as TrainConfig will see it ('1e-4' -> 0.0001); ValidationError if bad."""
    return getattr(Recipe.model_validate({key: value}), key)
