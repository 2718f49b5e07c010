"""The haystack of the synthetic suites: filler text of a given token length, with sentences inserted at depths.

The default haystack is the documentation of Python's own standard library (every installation carries it, so
nothing is downloaded); :meth:`Haystack.from_path` takes a user's corpus instead (a ``.txt`` file or a folder of
them, paragraphs separated by blank lines). Filler is drawn from consecutive paragraphs starting at a random one,
a sentence at a time, so that its length in tokens lands on a target; token counts of every sentence are computed
once per tokenizer and cached. The docstrings differ a little between Python versions, and so do the samples.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from kvcake.eval.sample import EvalDataError

#: The modules of the original needle haystack (:mod:`kvcake.needle`), in order.
HAYSTACK_MODULES = (
    "collections", "itertools", "functools", "json", "textwrap", "string", "random", "statistics", "decimal",
    "fractions", "heapq", "bisect", "datetime", "calendar", "csv", "argparse", "logging", "pathlib", "shutil",
    "tempfile", "threading", "queue", "contextlib", "dataclasses", "enum", "typing", "unittest", "difflib",
)

#: More prose-heavy pure modules present in every CPython >= 3.10, appended so the default haystack holds about
#: 85K tokens of distinct text (longer contexts cycle through it again).
EXTRA_MODULES = (
    "os", "re", "io", "abc", "ast", "inspect", "email.message", "email.utils", "http.client", "http.server",
    "urllib.request", "urllib.parse", "tarfile", "zipfile", "gzip", "hashlib", "base64", "codecs", "locale",
    "filecmp", "socket", "subprocess", "copy", "weakref", "operator", "math", "array", "configparser", "plistlib",
    "xml.etree.ElementTree", "mimetypes", "smtplib", "imaplib", "ftplib", "uuid", "ipaddress", "optparse", "getopt",
    "platform", "traceback", "timeit", "pstats", "doctest", "codeop", "cmd",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_BOUNDARY = re.compile(r"[.!?](?=\s)")
_WORD = re.compile(r"(?<![\w.\-])[a-z]{4,10}(?![\w(\-]|\.\w)")
_VOWEL = re.compile(r"[aeiouy]")
_STOPWORDS = frozenset((
    "about", "above", "after", "again", "against", "also", "although", "among", "another", "because", "been", "before",
    "being", "below", "between", "both", "cannot", "could", "does", "doing", "done", "down", "during", "each", "either",
    "else", "even", "ever", "every", "from", "further", "have", "having", "here", "however", "into", "itself", "just",
    "less", "like", "made", "make", "many", "might", "more", "most", "much", "must", "need", "neither", "never", "none",
    "only", "other", "otherwise", "over", "same", "should", "since", "some", "such", "than", "that", "their", "them",
    "then", "there", "these", "they", "this", "those", "though", "through", "thus", "under", "unless", "until", "upon",
    "used", "uses", "using", "very", "want", "were", "what", "when", "where", "whether", "which", "while", "will",
    "with", "within", "without", "would", "your", "yours",
))


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def seeded(seed: int, *parts: object) -> random.Random:
    """A generator seeded from ``seed`` and ``parts``: the same in every process (a str seed is hashed with
    SHA-512, never with Python's per-process salted ``hash()``)."""
    return random.Random("/".join(map(str, (seed, *parts))))


def _module_paragraphs(name: str) -> list[str]:
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # e.g. typing.io, typing.re
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
    paragraphs = []
    for doc in docs:
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            if len(text) > 80 and ">>>" not in text:
                paragraphs.append(text)
    return paragraphs


def _split_paragraphs(text: str) -> list[str]:
    return [p for p in (" ".join(block.split()) for block in re.split(r"\n\s*\n", text)) if p]


class Haystack:
    """Paragraphs of filler text, each a run of sentences."""

    _stdlib: ClassVar[dict[tuple[str, ...], Haystack]] = {}

    def __init__(self, paragraphs: Iterable[str], name: str = "custom"):
        self.paragraphs: tuple[str, ...] = tuple(" ".join(p.split()) for p in paragraphs if p.strip())
        if not self.paragraphs:
            raise EvalDataError(f"haystack {name!r} has no text")
        self.name = name
        self.sentences: tuple[tuple[str, ...], ...] = tuple(tuple(_SENTENCE_END.split(p)) for p in self.paragraphs)
        self._sentence_counts: dict[int, tuple[object, list[list[int]]]] = {}
        self._paragraph_counts: dict[int, tuple[object, list[int]]] = {}
        self._words: list[str] | None = None

    @classmethod
    def default(cls) -> Haystack:
        """The standard library's documentation (:data:`HAYSTACK_MODULES` then :data:`EXTRA_MODULES`)."""
        return cls.stdlib(HAYSTACK_MODULES + EXTRA_MODULES)

    @classmethod
    def stdlib(cls, modules: Sequence[str]) -> Haystack:
        """Docstring paragraphs of ``modules`` (a module that cannot be imported is skipped); cached."""
        key = tuple(modules)
        if key not in cls._stdlib:
            paragraphs = []
            for name in key:
                try:
                    paragraphs += _module_paragraphs(name)
                except ImportError:
                    continue
            cls._stdlib[key] = cls(paragraphs, name="stdlib")
        return cls._stdlib[key]

    @classmethod
    def from_path(cls, path: str | Path) -> Haystack:
        """A user's corpus: a text file, or every ``*.txt`` under a folder (in sorted order)."""
        path = Path(path).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise EvalDataError(f"no .txt files under the haystack folder {path}")
        else:
            raise EvalDataError(f"haystack path {path} does not exist")
        paragraphs = []
        for file in files:
            paragraphs += _split_paragraphs(file.read_text(encoding="utf-8", errors="replace"))
        if not paragraphs:
            raise EvalDataError(f"the haystack corpus at {path} is empty")
        return cls(paragraphs, name=str(path))

    def sentence_tokens(self, tokenizer) -> list[list[int]]:
        """Token count of every sentence of every paragraph, computed once per tokenizer."""
        key = id(tokenizer)
        if key not in self._sentence_counts:
            flat = [s for para in self.sentences for s in para]
            ids = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"]
            counts, i = [], 0
            for para in self.sentences:
                counts.append([len(x) for x in ids[i:i + len(para)]])
                i += len(para)
            self._sentence_counts[key] = (tokenizer, counts)  # holding the tokenizer keeps its id unique
        return self._sentence_counts[key][1]

    def paragraph_tokens(self, tokenizer) -> list[int]:
        """Token count of every paragraph (tokenized whole), computed once per tokenizer."""
        key = id(tokenizer)
        if key not in self._paragraph_counts:
            ids = tokenizer(list(self.paragraphs), add_special_tokens=False, verbose=False)["input_ids"]
            self._paragraph_counts[key] = (tokenizer, [len(x) for x in ids])
        return self._paragraph_counts[key][1]

    def filler(self, tokenizer, tokens: int, rng: random.Random) -> str:
        """About ``tokens`` tokens of text: whole sentences of consecutive paragraphs from a random one (cycling
        through the corpus when it is shorter); near the end, sentences too long for what is left are skipped."""
        counts = self.sentence_tokens(tokenizer)
        n = len(self.paragraphs)
        p = rng.randrange(n)
        chosen: list[str] = []
        total = skipped = 0
        while tokens - total > 2 and skipped < 64:
            kept: list[str] = []
            for sentence, cost in zip(self.sentences[p], counts[p], strict=True):
                cost += 1 if (chosen and not kept) else 0  # the blank line between paragraphs
                if total + cost <= tokens:
                    kept.append(sentence)
                    total += cost
                else:
                    skipped += 1
            if kept:
                chosen.append(" ".join(kept))
            p = (p + 1) % n
        return "\n\n".join(chosen)

    @staticmethod
    def insert(text: str, items: Sequence[tuple[float, str]]) -> str:
        """Insert each ``(depth, sentence)`` at the sentence boundary of ``text`` nearest to relative character
        position ``depth`` in [0, 1] (0: before everything, 1: after everything). Sentences given for the same
        boundary keep their order."""
        bounds = [0] + [m.end() for m in _BOUNDARY.finditer(text)] + [len(text)]
        at: dict[int, list[str]] = {}
        for depth, sentence in items:
            if not 0.0 <= depth <= 1.0:
                raise EvalDataError(f"depth {depth} is outside [0, 1]")
            target = depth * len(text)
            pos = min(bounds, key=lambda b: (abs(b - target), b))
            at.setdefault(pos, []).append(sentence)
        pieces, last = [], 0
        for pos in sorted(at):
            pieces.append(text[last:pos])
            block = " ".join(at[pos])
            if pos == 0:
                pieces.append(block + (" " if text else ""))
            else:
                pieces.append(" " + block)
            last = pos
        pieces.append(text[last:])
        return "".join(pieces)

    def context(self, tokenizer, tokens: int, rng: random.Random, *, needles: Sequence[tuple[float, str]] = (),
                prefix: str = "", question: str = "") -> tuple[str, int]:
        """Filler with ``needles`` inserted, sized so that ``prefix + context + question`` is about ``tokens``
        tokens; returns the context and the measured length of the whole."""
        fill = rng.getrandbits(64)
        overhead = count_tokens(tokenizer, prefix + question) + sum(count_tokens(tokenizer, s) + 1 for _, s in needles)
        budget = tokens - overhead
        if budget < 0.1 * tokens:
            raise EvalDataError(f"a length of {tokens} tokens leaves too little room for the haystack "
                                f"(the prompt without it takes {overhead})")
        best: tuple[int, str, int] | None = None
        for _ in range(4):
            text = self.insert(self.filler(tokenizer, budget, random.Random(fill)), needles)
            measured = count_tokens(tokenizer, prefix + text + question)
            if best is None or abs(measured - tokens) < best[0]:
                best = (abs(measured - tokens), text, measured)
            if abs(measured - tokens) <= max(2, tokens // 200):
                break
            budget += tokens - measured
        assert best is not None  # the loop ran at least once
        return best[1], best[2]

    def words(self) -> list[str]:
        """Distinct lower-case English-like words of the corpus (4 to 10 letters, no stop words), sorted."""
        if self._words is None:
            found: set[str] = set()
            for para in self.paragraphs:
                found.update(w for w in _WORD.findall(para) if w not in _STOPWORDS and _VOWEL.search(w))
            self._words = sorted(found)
        return list(self._words)
