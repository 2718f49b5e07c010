"""A single-needle retrieval check over an offline haystack (Python's own documentation strings).

Every Python installation carries the docstrings of its standard library, so the haystack needs no download. The
needle is a sentence with a random number, inserted at a relative depth; the model is asked for the number at the
end. The fuller NeedleBench/RULER-style suites build on this.
"""

from __future__ import annotations

import importlib
import inspect
import random
from dataclasses import dataclass

HAYSTACK_MODULES = (
    "collections", "itertools", "functools", "json", "textwrap", "string", "random", "statistics", "decimal",
    "fractions", "heapq", "bisect", "datetime", "calendar", "csv", "argparse", "logging", "pathlib", "shutil",
    "tempfile", "threading", "queue", "contextlib", "dataclasses", "enum", "typing", "unittest", "difflib",
)


def haystack_paragraphs() -> list[str]:
    """Documentation paragraphs of standard-library modules, in a fixed order."""
    paragraphs: list[str] = []
    for name in HAYSTACK_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if len(text) > 80 and ">>>" not in text:
                    paragraphs.append(text)
    return paragraphs


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
    paragraphs = haystack_paragraphs()
    start = rng.randrange(len(paragraphs))
    chosen, count = [], 0
    i = start
    while count < tokens:
        para = paragraphs[i % len(paragraphs)]
        n = len(tokenizer(para, add_special_tokens=False)["input_ids"])
        chosen.append(para)
        count += n
        i += 1
    at = round(depth * len(chosen))
    chosen.insert(at, needle)
    return NeedleCase(context="\n\n".join(chosen), question="What is the special magic number?", answer=number,
                      depth=depth)
