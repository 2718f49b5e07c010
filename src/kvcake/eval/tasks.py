"""The suites and their tasks by name, and building their samples for a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvcake.eval.haystack import Haystack
from kvcake.eval.sample import EvalDataError, Sample
from kvcake.eval.suites import longbench, needlebench, ruler

SUITES: dict[str, tuple[str, ...]] = {
    "needlebench": tuple(f"needlebench/{t}" for t in needlebench.TASKS),
    "ruler": tuple(f"ruler/{t}" for t in ruler.TASKS),
    "longbench": tuple(f"longbench/{t}" for t in longbench.TASKS_EN),
    "longbench-zh": tuple(f"longbench/{t}" for t in longbench.TASKS_ZH),
}


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
        suite, name = task.split("/", 1)
        if suite == "longbench":
            if options.data is None:
                raise EvalDataError(f"{task} needs the LongBench data: pass --data FOLDER (the extracted data.zip of "
                                    "THUDM/LongBench, or a folder of <task>.jsonl files)")
            longbench.load(name, options.data, limit=1)
    if options.corpus is not None:
        Haystack.from_path(options.corpus)
    return tasks


def load_samples(names: list[str], tokenizer, options: SuiteOptions) -> list[Sample]:
    """The samples of every named task, in order (the first ``options.limit`` of each task)."""
    samples: list[Sample] = []
    haystack = None
    for task in expand(names):
        suite, name = task.split("/", 1)
        if suite == "longbench":
            if options.data is None:
                raise EvalDataError(f"{task} needs the LongBench data: pass --data FOLDER (the extracted data.zip of "
                                    "THUDM/LongBench, or a folder of <task>.jsonl files)")
            samples += longbench.load(name, options.data, limit=options.limit)
            continue
        if haystack is None:
            haystack = Haystack.from_path(options.corpus) if options.corpus else Haystack.default()
        module = needlebench if suite == "needlebench" else ruler
        samples += module.generate(name, tokenizer, lengths=options.lengths, depths=options.depths,
                                   per_cell=options.per_cell, seed=options.seed, haystack=haystack,
                                   limit=options.limit)
    return samples
