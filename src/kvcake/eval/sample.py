"""One evaluation sample, whatever suite it comes from.

A prompt is ``prefix + context + question``, then ``answer_prefix``: under a chat template it opens the assistant's
turn (RULER's answer prefix, which the model continues rather than restates). The context is the long part; in the
query-agnostic mode it is prefilled (and compressed) on its own and the question is fed afterwards, in the
query-aware mode the whole prompt is prefilled and compressed together (the paper's setting). Both modes see the
same tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


class EvalDataError(ValueError):
    """Bad evaluation input: a missing data folder, a malformed line, an unknown task or metric."""


@dataclass
class Sample:
    task: str                  # "longbench/hotpotqa", "needlebench/single", "ruler/niah_multikey", ...
    id: str                    # unique within the task
    context: str               # the long part of the prompt
    question: str              # prompt text after the context (the query, the answer cue); may be ""
    answers: list[str]         # references
    metric: str                # a name in kvcake.eval.metrics.METRICS
    max_new_tokens: int
    prefix: str = ""           # prompt text before the context (instructions)
    chat: bool = True          # wrap the prompt in the model's chat template (when it has one)
    answer_prefix: str = ""    # the start of the answer, after the template's generation prompt: the model goes on
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. length, depth, all_classes, first_line_only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """A short hash of everything the sample is (prompt text, references, metric, answer length, chat rule,
        meta): rows answering one version of a sample are never reused for another."""
        data = self.to_dict()
        if not data["answer_prefix"]:  # samples made before the field existed keep their hash
            del data["answer_prefix"]
        text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(**data)


#: A metric maps ``(prediction, references, sample)`` to a score in [0, 100].
Metric = Callable[[str, list[str], Sample], float]
