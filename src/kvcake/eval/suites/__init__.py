"""The benchmark suites: LongBench (v1) from its official data, and NeedleBench- and RULER-style tasks generated
over the offline haystack (:mod:`kvcake.eval.haystack`).

A suite is one module here: it lists its suites in ``SUITES`` (:class:`Suite`: the name, the task names, how to build
the samples of a task and how to check its options) and its metrics in ``METRICS``. :mod:`kvcake.eval.tasks` and
:mod:`kvcake.eval.metrics` find every module of this package, so a new suite needs no other edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvcake.eval.haystack import Haystack
    from kvcake.eval.sample import Sample
    from kvcake.eval.tasks import SuiteOptions


@dataclass(frozen=True)
class Suite:
    """One suite: ``prefix/task`` names its tasks (several suites may share a prefix, as LongBench's English and
    Chinese sets do).

    ``samples(task, tokenizer, options, haystack)`` builds a task's samples (``haystack()`` gives the shared
    offline haystack, built on first use); ``check(task, options)``, if given, refuses bad options before any model
    is loaded.
    """

    name: str
    prefix: str
    tasks: tuple[str, ...]
    samples: Callable[[str, Any, SuiteOptions, Callable[[], Haystack]], list[Sample]]
    check: Callable[[str, SuiteOptions], None] | None = None

    def task_names(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}/{t}" for t in self.tasks)


__all__ = ["Suite"]
