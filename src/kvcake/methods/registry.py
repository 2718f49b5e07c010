"""Methods by name, for the command line and the evaluation harness."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvcake.methods.cake import CAKE

#: name -> method class; ``full`` means no eviction (the reference).
METHODS: dict[str, type | None] = {"full": None, "cake": CAKE}


def method_names() -> list[str]:
    return list(METHODS)


def build(name: str, budget: int | None = None, ratio: float | None = None, **params: Any):
    """Instantiate method ``name`` (None for ``full``) with a budget and validated parameters.

    Parameters left as None are not passed, so each method keeps its paper's defaults.
    """
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[key]
    if cls is None:
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in params.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}")
    given = {k: v for k, v in params.items() if v is not None}
    return cls(budget=budget, ratio=ratio, **given)
