"""Metrics by name. Every metric maps ``(prediction, references, sample)`` to a score in [0, 100]."""

from __future__ import annotations

from collections.abc import Callable

from kvcake.eval.sample import EvalDataError, Sample

Metric = Callable[[str, list[str], Sample], float]

METRICS: dict[str, Metric] = {}


def register(name: str) -> Callable[[Metric], Metric]:
    """Decorator: make ``fn`` available as metric ``name``."""

    def wrap(fn: Metric) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = fn
        return fn

    return wrap


def get(name: str) -> Metric:
    # the suites register their metrics when imported
    from kvcake.eval import tasks  # noqa: F401

    if name not in METRICS:
        raise EvalDataError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def score(sample: Sample, prediction: str) -> float:
    """Score ``prediction`` for ``sample`` with the sample's metric, in [0, 100]."""
    return float(get(sample.metric)(prediction, list(sample.answers), sample))
