"""Field types that several features' request bodies share: the clothing class (an index or a name),
bounded numbers that refuse booleans, and the sampler names.

Each feature's bodies are in its own ``schemas.py`` (``app.generation.schemas``, ``app.clip.schemas``);
what is here is only what more than one of them uses.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from model.data import CLASS_NAMES, NUM_CLASSES, class_allowed, parse_class
from model.samplers import SAMPLERS, sampler_named

SEED_MAX = 2**32 - 1

CLASS_ALLOWED = class_allowed()


def class_index(value: Any) -> int:
    """The class ``value`` names (``parse_class``: an index, a name, or a text naming one class), or a
    ``class_value`` validation error with parse_class's message, which says what is allowed."""
    try:
        return parse_class(value)
    except ValueError as err:
        raise PydanticCustomError("class_value", "{why}", {"why": str(err)}) from None


ClassField = Annotated[
    int,
    BeforeValidator(class_index),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": NUM_CLASSES - 1},
                {"type": "string", "enum": list(CLASS_NAMES)},
            ],
            "description": f"the clothing class: {CLASS_ALLOWED}; names are case-insensitive",
            "examples": [3, "dress"],
        }
    ),
]


def sampler_value(value: Any) -> str:
    """A name of the sampler registry (``model.samplers.REGISTRY``), or a ``sampler_value`` error naming them."""
    if not isinstance(value, str):
        raise PydanticCustomError(
            "sampler_value", "must be a sampler name; allowed: {allowed}", {"allowed": ", ".join(SAMPLERS)}
        )
    try:
        return sampler_named(value).name
    except ValueError as err:
        raise PydanticCustomError("sampler_value", "{why}", {"why": str(err)}) from None


# The API's sampler names are the registry's keys: adding an entry there serves it everywhere.
SamplerName = Annotated[
    str,
    BeforeValidator(sampler_value),
    WithJsonSchema({"type": "string", "enum": list(SAMPLERS), "description": "a sampler of model.samplers"}),
]


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; a boolean is never a sensible count, seed or scale.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_allowed", "must be a number, not a boolean")
    return value


def bounded_int(lo: int | None = None, hi: int | None = None) -> Any:
    """An int type with bounds inside the annotation, so ``X | None`` documents them as minimum/maximum
    (bounds before the validator: after it, pydantic can only show them as unknown "ge"/"le" keys)."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_no_bool)]


def bounded_float(lo: float | None = None, hi: float | None = None) -> Any:
    return Annotated[float, Field(ge=lo, le=hi, allow_inf_nan=False), BeforeValidator(_no_bool)]


# The same, spelled out statically for type checkers.
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_no_bool)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False), BeforeValidator(_no_bool)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_no_bool)]
