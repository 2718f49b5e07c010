"""Metrics by name: the table of every suite's metrics. Each maps ``(prediction, references, sample)`` to a score
in [0, 100].

The table is built here from the suites' own ``METRICS`` tables, so that no module relies on another's import
having registered something; :func:`register` adds a metric of one's own.
"""

from __future__ import annotations

import importlib
import pkgutil

from kvcake.eval import suites
from kvcake.eval.sample import EvalDataError, Metric, Sample

__all__ = ["METRICS", "Metric", "get", "register", "score"]


def _table(*tables: dict[str, Metric]) -> dict[str, Metric]:
    merged: dict[str, Metric] = {}
    for table in tables:
        for name, fn in table.items():
            if name in merged:
                raise ValueError(f"metric {name!r} is defined by two suites")
            merged[name] = fn
    return merged


def _suite_tables() -> list[dict[str, Metric]]:
    """The ``METRICS`` table of every module of :mod:`kvcake.eval.suites` (a new suite needs no edit here)."""
    modules = sorted(pkgutil.iter_modules(suites.__path__), key=lambda m: m.name)
    return [getattr(importlib.import_module(f"{suites.__name__}.{m.name}"), "METRICS", {}) for m in modules]


METRICS: dict[str, Metric] = _table(*_suite_tables())


def register(name: str, fn: Metric) -> Metric:
    """Make ``fn`` available as metric ``name`` (a name no suite uses); returns ``fn``."""
    if name in METRICS:
        raise ValueError(f"metric {name!r} exists already")
    METRICS[name] = fn
    return fn


def get(name: str) -> Metric:
    """The metric called ``name``."""
    if name not in METRICS:
        raise EvalDataError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def score(sample: Sample, prediction: str) -> float:
    """Score ``prediction`` for ``sample`` with the sample's metric, in [0, 100]."""
    return float(get(sample.metric)(prediction, list(sample.answers), sample))
