"""Typed, bounded detector parameters, read from each detector's ``__init__`` signature.

The annotation of a keyword parameter gives its type and ``_parameter_bounds`` its range; the
same pydantic model validates a config's ``detectors[i].params`` and a detector's ``fit``
(as scikit-learn's ``_validate_params`` does), so the two can never disagree.
"""

from __future__ import annotations

import functools
import inspect
import typing

from pydantic import ConfigDict, Field, ValidationError, create_model


@functools.cache
def params_model(cls: type):
    """A strict pydantic model of ``cls``'s parameters (unknown keys and coercions refused)."""
    hints = typing.get_type_hints(cls.__init__)
    bounds = getattr(cls, "_parameter_bounds", {})
    fields = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        fields[name] = (hints[name], Field(default=param.default, **bounds.get(name, {})))
    return create_model(f"{cls.__name__}Params",
                        __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False), **fields)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a validation error's first problem."""
    error = exc.errors()[0]
    return ".".join(str(p) for p in error["loc"]) or "params", error["msg"]


def validate_params(cls: type, params: dict) -> dict:
    """Checked parameters of ``cls``; ValueError naming the first bad field."""
    try:
        return params_model(cls).model_validate(params).model_dump()
    except ValidationError as exc:
        field, message = first_error(exc)
        raise ValueError(f"{cls.__name__}: parameter {field}: {message}") from None
