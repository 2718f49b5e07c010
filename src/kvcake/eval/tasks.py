"""The suites and their tasks by name, and building their samples for a tokenizer."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

from kvcake.eval import suites as suites_package
from kvcake.eval.haystack import Haystack
from kvcake.eval.sample import EvalDataError, Sample
from kvcake.eval.suites import Suite


def _discover() -> dict[str, Suite]:
    """Every suite the modules of :mod:`kvcake.eval.suites` declare, by name."""
    found: dict[str, Suite] = {}
    for info in sorted(pkgutil.iter_modules(suites_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{suites_package.__name__}.{info.name}")
        for suite in getattr(module, "SUITES", ()):
            if suite.name in found:
                raise ImportError(f"suite {suite.name!r} is declared twice")
            found[suite.name] = suite
    order = ["needlebench", "ruler", "longbench", "longbench-zh"]  # the usual order first, then any other
    return {name: found[name] for name in sorted(found, key=lambda n: (order.index(n) if n in order else 99, n))}


_SUITES = _discover()
SUITES: dict[str, tuple[str, ...]] = {name: suite.task_names() for name, suite in _SUITES.items()}


def _suite_of(task: str) -> tuple[Suite, str]:
    prefix, name = task.split("/", 1)
    for suite in _SUITES.values():
        if suite.prefix == prefix and name in suite.tasks:
            return suite, name
    raise EvalDataError(f"unknown task {task!r}")


@dataclass
class SuiteOptions:
    """How to build samples: LongBench's data folder, and the synthetic suites' lengths, depths and haystack."""

    data: Path | None = None
    lengths: list[int] = field(default_factory=lambda: [1000, 2000])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    per_cell: int = 1
    seed: int = 0
    corpus: Path | None = None
    limit: int | None = None  # the first N samples of each task (every suite)

    def to_dict(self) -> dict:
        return {"data": str(self.data) if self.data else None, "lengths": self.lengths, "depths": self.depths,
                "per_cell": self.per_cell, "seed": self.seed, "corpus": str(self.corpus) if self.corpus else None,
                "limit": self.limit}


def all_tasks() -> list[str]:
    return [t for tasks in SUITES.values() for t in tasks]


def expand(names: list[str]) -> list[str]:
    """Suite names (``ruler``) and task names (``ruler/vt``, ``longbench/multi_news``) to task names, in order."""
    known = all_tasks()
    tasks: list[str] = []
    for name in names:
        name = name.strip().lower()
        found = SUITES.get(name) or ((name,) if name in known else None)
        if found is None:
            raise EvalDataError(
                f"unknown task or suite {name!r}; suites: {', '.join(SUITES)}; tasks: {', '.join(known)}"
            )
        tasks += [t for t in found if t not in tasks]
    return tasks


def check(names: list[str], options: SuiteOptions) -> list[str]:
    """Expand ``names`` and check the options and LongBench's data, before any model is loaded."""
    if options.limit is not None and options.limit < 1:
        raise EvalDataError(f"--limit takes a positive number of samples per task, not {options.limit}")
    tasks = expand(names)
    for task in tasks:
        suite, name = _suite_of(task)
        if suite.check is not None:
            suite.check(name, options)
    if options.corpus is not None:
        Haystack.from_path(options.corpus)
    return tasks


def load_samples(names: list[str], tokenizer, options: SuiteOptions) -> list[Sample]:
    """The samples of every named task, in order (the first ``options.limit`` of each task)."""
    samples: list[Sample] = []
    shared: list[Haystack] = []

    def haystack() -> Haystack:  # built once, on first use
        if not shared:
            shared.append(Haystack.from_path(options.corpus) if options.corpus else Haystack.default())
        return shared[0]

    for task in expand(names):
        suite, name = _suite_of(task)
        samples += suite.samples(name, tokenizer, options, haystack)
    return samples
