"""A single-needle retrieval check over an offline haystack (Python's own documentation strings).

Every Python installation carries the docstrings of its standard library, so the haystack needs no download (see
:mod:`kvcake.eval.haystack`, which the NeedleBench/RULER-style suites share). The needle is a sentence with a random
number, inserted between paragraphs at a relative depth; the model is asked for the number at the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvcake.eval.haystack import HAYSTACK_MODULES, Haystack

__all__ = ["HAYSTACK_MODULES", "NeedleCase", "haystack_paragraphs", "needle_case"]


def haystack_paragraphs() -> list[str]:
    """Documentation paragraphs of standard-library modules, in a fixed order."""
    return list(Haystack.stdlib(HAYSTACK_MODULES).paragraphs)


@dataclass
class NeedleCase:
    context: str
    question: str
    answer: str
    depth: float


def needle_case(tokenizer, tokens: int, depth: float, seed: int = 0) -> NeedleCase:
    """A haystack of about ``tokens`` tokens with the needle at relative ``depth`` in [0, 1]."""
    rng = random.Random(seed)
    number = str(rng.randint(1000, 9999))
    needle = f"The special magic number is {number}."
    haystack = Haystack.stdlib(HAYSTACK_MODULES)
    paragraphs, counts = haystack.paragraphs, haystack.paragraph_tokens(tokenizer)
    start = rng.randrange(len(paragraphs))
    chosen, count = [], 0
    i = start
    while count < tokens:
        chosen.append(paragraphs[i % len(paragraphs)])
        count += counts[i % len(paragraphs)]
        i += 1
    at = round(depth * len(chosen))
    chosen.insert(at, needle)
    return NeedleCase(context="\n\n".join(chosen), question="What is the special magic number?", answer=number,
                      depth=depth)
