"""Pydantic models put together from fields the engine made itself, without validating them again.

Run events and run records are built from the engine's own state, whose
values already have their declared types; validating them once more is most
of what reading an event or awaiting a run costs. :func:`construct` puts a
model together the way pydantic's own ``__copy__`` does: the fields dict
becomes the model's, and the fields set is the caller's (shared between
models of a class: pydantic copies it before a ``model_copy`` changes it).
Where pydantic's slot layout is not the one expected, :data:`FAST` is False
and callers validate as usual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

new = object.__new__
# the setters of a pydantic model's four slots, taken once: each is a direct store, where
# object.__setattr__ would look the name up every time
try:
    set_dict, set_fields_set, set_extra, set_private = (
        vars(BaseModel)[slot].__set__
        for slot in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
    )
    FAST = True
except (KeyError, AttributeError):  # pragma: no cover - pydantic's own layout changed
    FAST = False


def construct(cls: type[M], fields: dict[str, Any], fields_set: set[str]) -> M:
    """A ``cls`` holding ``fields`` (every field of ``cls``, each of its declared type)."""
    if not FAST:  # pragma: no cover - see FAST
        return cls.__pydantic_validator__.validate_python(fields)  # type: ignore[no-any-return]
    model = new(cls)
    set_dict(model, fields)
    set_fields_set(model, fields_set)
    set_extra(model, None)
    set_private(model, None)
    return model  # type: ignore[no-any-return]


def float_clock(clock: Callable[[], float]) -> Callable[[], float]:
    """``clock``, giving floats: timestamps go into models put together here unvalidated
    (``time.time`` gives floats; a clock replaced for tests may give ints)."""
    if clock is time.time or getattr(clock, "gives_floats", False):
        return clock

    def floated() -> float:
        return float(clock())

    floated.gives_floats = True  # type: ignore[attr-defined]
    return floated
