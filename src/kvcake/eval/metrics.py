"""Metrics by name: the table of every suite's metrics. Each maps ``(prediction, references, sample)`` to a score
in [0, 100].

The table is built here from the suites' own ``METRICS`` tables, so that no module relies on another's import
having registered something; :func:`register` adds a metric of one's own.
"""

from __future__ import annotations

from kvcake.eval.sample import EvalDataError, Metric, Sample
from kvcake.eval.suites import longbench_metrics, needlebench, ruler

__all__ = ["METRICS", "Metric", "get", "register", "score"]


def _table(*tables: dict[str, Metric]) -> dict[str, Metric]:
    merged: dict[str, Metric] = {}
    for table in tables:
        for name, fn in table.items():
            if name in merged:
                raise ValueError(f"metric {name!r} is defined by two suites")
            merged[name] = fn
    return merged


METRICS: dict[str, Metric] = _table(longbench_metrics.METRICS, needlebench.METRICS, ruler.METRICS)


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
