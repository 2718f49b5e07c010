"""RULER-style tasks (NVIDIA/RULER, ``scripts/data/synthetic``): retrieval, multi-hop tracing and aggregation.

Templates, answer prefixes, generation lengths and metrics are RULER's (``constants.py`` of ``scripts/data/synthetic``
and ``scripts/eval/synthetic``, ``synthetic.yaml``); the haystack is ours (:mod:`kvcake.eval.haystack`, in place of
the Paul Graham essays), and so are the keys: two corpus words joined by a hyphen (RULER: an adjective and a noun).

* ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." (a 7-digit value) at the
  depth. ``niah_multikey``: 4 needles with different keys, one asked (at the depth; the other three at random
  depths). ``niah_multivalue``: 4 values for one key, all asked. ``niah_multiquery``: 4 keys, all asked. In the last
  two the first needle is at the depth and the others at random depths.
* ``vt``: one chain of 4 hops (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ...) at random positions of the
  haystack, after a short one-shot example; the answer is the 5 variables that hold the value. Its answer cue is
  the sample's ``answer_prefix``, which opens the assistant's turn as RULER's answer prefix does, so the model
  continues it with the names (inside the user's turn the models restate the cue and run out of vt's 30 tokens).
  The ``niah_*`` cues stay at the end of the user's turn: the models answer them within their 128 tokens.
* ``cwe``: a numbered list of words where 10 occur often (30 times, 6 below 4096 tokens) and the others rarely (3
  times, once below 4096), after a one-shot example; the answer is the 10 frequent ones. Words come from the
  haystack (:meth:`Haystack.words`), pairs of them when it runs short.
* ``fwe``: random 6-letter coded words with Zipf counts (alpha 2, the most frequent replaced by ``...``); the answer
  is the next three.

``vt``, ``cwe`` and ``fwe`` have no depth: they make ``per_cell`` samples per length. Scores are RULER's
``string_match_all`` (the share of references found in the prediction, case-insensitive, x 100) for every task, and
``string_match_part`` (100 if any reference is found) is in :data:`METRICS` too.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence

from kvcake.eval.haystack import Haystack, count_tokens, seeded
from kvcake.eval.sample import EvalDataError, Metric, Sample
from kvcake.eval.suites import Suite

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
DEPTH_TASKS = TASKS[:4]
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

NIAH_SHAPES = {  # (keys, values per key, keys asked), as RULER's synthetic.yaml
    "niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4),
}
VT_HOPS = 4
CWE_COMMON = 10
FWE_ALPHA = 2.0
_MARK = "\x00CONTEXT\x00"


def _split(template: str, **fields: object) -> tuple[str, str]:
    """The prompt text before and after ``{context}``."""
    head, tail = template.format(context=_MARK, **fields).split(_MARK)
    return head, tail


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _keys(haystack: Haystack, rng: random.Random, n: int) -> list[str]:
    words = haystack.words()
    if len(words) < 2:
        raise EvalDataError(f"haystack {haystack.name!r} has too few words to make keys")
    keys: list[str] = []
    for _ in range(100 * n):
        key = "-".join(rng.sample(words, 2))
        if key not in keys:
            keys.append(key)
            if len(keys) == n:
                return keys
    raise EvalDataError(f"haystack {haystack.name!r} has too few words to make {n} distinct keys")


def _niah(task: str, haystack: Haystack, rng: random.Random, depth: float) -> dict:
    n_keys, n_values, n_queries = NIAH_SHAPES[task]
    keys = _keys(haystack, rng, n_keys)
    values: list[list[str]] = []
    used: set[int] = set()
    for _ in keys:
        row = []
        for _ in range(n_values):
            v = rng.randint(10**6, 10**7 - 1)
            while v in used:
                v = rng.randint(10**6, 10**7 - 1)
            used.add(v)
            row.append(str(v))
        values.append(row)
    asked = rng.sample(range(n_keys), n_queries)
    needles = [NIAH_NEEDLE.format(type_needle_v="numbers", key=keys[i], value=v)
               for i in asked + [i for i in range(n_keys) if i not in asked] for v in values[i]]
    depths = [depth] + [rng.random() for _ in needles[1:]]
    template, kind = NIAH_TEMPLATE + NIAH_ANSWER, "numbers"
    if n_queries * n_values == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        kind = "number"
    prefix, question = _split(template, type_needle_v=kind, query=_join([keys[i] for i in asked]))
    return {"prefix": prefix, "question": question, "needles": list(zip(depths, needles, strict=True)),
            "answers": [v for i in asked for v in values[i]], "max_new_tokens": MAX_NEW_TOKENS["niah"],
            "meta": {"keys": keys, "asked": [keys[i] for i in asked], "needles": needles}}


def _vt_chain(rng: random.Random, letters: int, hops: int) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, chain, value


def _vt(haystack: Haystack, rng: random.Random) -> dict:
    ex_names, ex_chain, ex_value = _vt_chain(rng, 3, VT_HOPS)
    noise = [VT_NOISE] * 4
    slots = sorted(rng.sample(range(len(noise) + len(ex_chain)), len(ex_chain)))
    for pos, statement in zip(slots, ex_chain, strict=True):
        noise.insert(pos, statement)
    example = (VT_TEMPLATE + VT_ANSWER).format(context=" ".join(noise).replace(". \n", ".\n"), query=ex_value,
                                               num_v=VT_HOPS + 1)
    names, chain, value = _vt_chain(rng, 5, VT_HOPS)
    head, question = _split(VT_TEMPLATE, query=value)
    depths = sorted(rng.random() for _ in chain)
    return {"prefix": example + " ".join(ex_names) + "\n\n" + head, "question": question,
            "answer_prefix": VT_ANSWER.format(query=value, num_v=VT_HOPS + 1).lstrip(),
            "needles": list(zip(depths, chain, strict=True)), "answers": names, "max_new_tokens": MAX_NEW_TOKENS["vt"],
            "meta": {"chain": chain, "value": value}}


def _fit(build: Callable[[int], tuple[str, str, str]], tokenizer, target: int, low: int) -> tuple[int, int]:
    """The size ``n >= low`` whose ``build(n)`` = (prefix, context, question) is nearest ``target`` tokens, found by
    secant steps on the (nearly linear) token count; returns ``(n, tokens)``."""

    def measure(n: int) -> int:
        return count_tokens(tokenizer, "".join(build(n)))

    seen = {low: measure(low)}
    if seen[low] > target:
        raise EvalDataError(f"a length of {target} tokens is too short for this task (its smallest prompt takes "
                            f"{seen[low]})")
    probe = low + max(10, (low + 1) * 2)
    seen[probe] = measure(probe)
    a, b = low, probe
    for _ in range(6):
        slope = max((seen[b] - seen[a]) / (b - a), 1e-3)
        n = max(low, min(round(b + (target - seen[b]) / slope), 8 * b + 1000))
        if n in seen:
            break
        seen[n] = measure(n)
        a, b = b, n
        if abs(seen[n] - target) <= max(2, target // 200):
            break
    n = min(seen, key=lambda k: (abs(seen[k] - target), k))
    return n, seen[n]


def _vocabulary(haystack: Haystack, rng: random.Random, common: int, rare: int, exclude: set[str]) -> tuple[
        list[str], list[str]]:
    """``common`` words and ``rare`` others, none a substring of another; pairs of words when the corpus runs out."""
    pool = [w for w in haystack.words() if w not in exclude]
    if len(pool) < 2 * common:
        raise EvalDataError(f"haystack {haystack.name!r} has too few distinct words for common words extraction")
    rng.shuffle(pool)
    chosen: list[str] = []
    for w in pool:
        if not any(w in c or c in w for c in chosen):
            chosen.append(w)
            if len(chosen) == common:
                break
    others = [w for w in pool if not any(w in c or c in w for c in chosen)]
    seen, tries = set(others), 0
    while len(others) < rare:
        tries += 1
        if tries > 10 * rare + 1000:
            raise EvalDataError(f"haystack {haystack.name!r} has too few distinct words for {rare} rare words")
        pair = "-".join(rng.sample(pool, 2))
        if pair not in seen and not any(c in pair for c in chosen):
            seen.add(pair)
            others.append(pair)
    return chosen, others[:rare]


def _cwe(haystack: Haystack, tokenizer, rng: random.Random, target: int) -> tuple[dict, int]:
    small = target < 4096
    freq_common, freq_rare = (6, 1) if small else (30, 3)
    ex_size, ex_common, ex_rare = (20, 3, 1) if small else (40, 10, 3)
    exclude = set(re.findall(r"[a-z]+", (CWE_TEMPLATE + CWE_ANSWER).lower()))

    def numbered(words: Sequence[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def listing(sub: random.Random, common: list[str], rare: list[str], fc: int, fr: int) -> str:
        words = common * fc + rare * fr
        sub.shuffle(words)
        return numbered(words)

    ex_words, ex_others = _vocabulary(haystack, rng, CWE_COMMON, ex_size - CWE_COMMON, exclude)
    ex_list = listing(rng, ex_words, ex_others, ex_common, ex_rare)
    head, question = _split(CWE_TEMPLATE + CWE_ANSWER)
    example = (CWE_TEMPLATE + CWE_ANSWER).format(context=ex_list) + " " + numbered(ex_words) + "\n"
    exclude |= set(ex_words) | set(ex_others)
    sub_seed = rng.getrandbits(64)
    for prefix in (example + head, head):  # without the one-shot example when a short length leaves no room for it

        def build(rare: int, prefix: str = prefix) -> tuple[str, str, str]:
            sub = random.Random(sub_seed)
            common, others = _vocabulary(haystack, sub, CWE_COMMON, rare, exclude)
            return prefix, listing(sub, common, others, freq_common, freq_rare), question

        try:
            rare, measured = _fit(build, tokenizer, target, 0)
        except EvalDataError:
            if prefix == head:
                raise
            continue
        break
    common = _vocabulary(haystack, random.Random(sub_seed), CWE_COMMON, rare, exclude)[0]
    return {"prefix": prefix, "context": build(rare)[1], "question": question, "answers": common,
            "max_new_tokens": MAX_NEW_TOKENS["cwe"],
            "meta": {"rare_words": rare, "freq_common": freq_common, "freq_rare": freq_rare,
                     "one_shot": prefix != head}}, measured


def _fwe(tokenizer, rng: random.Random, target: int) -> tuple[dict, int]:
    size = max(10, target // 50)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    zeta = math.pi ** 2 / 6  # zeta(2)
    prefix, question = _split(FWE_TEMPLATE + FWE_ANSWER)
    sub_seed = rng.getrandbits(64)

    def counts(n: int) -> list[int]:
        return [int(n * k ** -FWE_ALPHA / zeta) for k in range(1, len(words) + 1)]

    def build(n: int) -> tuple[str, str, str]:
        text = [w for w, c in zip(words, counts(n), strict=True) for _ in range(c)]
        random.Random(sub_seed).shuffle(text)
        return prefix, " ".join(text), question

    low = 80  # the least total that keeps the counts of ranks 2 to 5 strictly apart
    n, measured = _fit(build, tokenizer, target, low)
    return {"prefix": prefix, "context": build(n)[1], "question": question, "answers": words[1:4],
            "max_new_tokens": MAX_NEW_TOKENS["fwe"], "meta": {"num_words": n, "vocab_size": size}}, measured


def generate(task: str, tokenizer, *, lengths: Sequence[int], depths: Sequence[float] = DEPTHS, per_cell: int = 1,
             seed: int = 0, haystack: Haystack | None = None, limit: int | None = None) -> list[Sample]:
    """Samples of prompts of about ``length`` tokens (prefix, context and question, measured with ``tokenizer``):
    one per (length, depth, repetition) for the ``niah_*`` tasks, ``per_cell`` per length for ``vt``, ``cwe`` and
    ``fwe`` (which ignore ``depths``). ``limit`` keeps the first ``limit`` samples of that order (the same samples
    as without it)."""
    if task not in TASKS:
        raise EvalDataError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if per_cell < 1 or any(int(n) <= 0 for n in lengths):
        raise EvalDataError("lengths and per_cell must be positive")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalDataError(f"depth {d} is outside [0, 1]")
    haystack = haystack or Haystack.default()
    cells = [(int(n), float(d)) for n in lengths for d in depths] if task in DEPTH_TASKS else \
        [(int(n), None) for n in lengths]
    samples: list[Sample] = []
    for length, depth in cells:
        for rep in range(per_cell):
            if limit is not None and len(samples) >= limit:
                return samples
            rng = seeded(seed, "ruler", task, length, depth, rep)
            if task in DEPTH_TASKS or task == "vt":
                spec = _niah(task, haystack, rng, depth) if depth is not None else _vt(haystack, rng)
                context, measured = haystack.context(tokenizer, length, rng, needles=spec["needles"],
                                                     prefix=spec["prefix"],
                                                     question=spec["question"] + spec.get("answer_prefix", ""))
                spec["meta"]["depths"] = [d for d, _ in spec["needles"]]
            elif task == "cwe":
                spec, measured = _cwe(haystack, tokenizer, rng, length)
                context = spec["context"]
            else:
                spec, measured = _fwe(tokenizer, rng, length)
                context = spec["context"]
            meta = {"length": length, "tokens": measured, **({"depth": depth} if depth is not None else {}),
                    "haystack": haystack.name if task != "fwe" else None, **spec["meta"]}
            ident = f"L{length}_D{depth:g}_R{rep}" if depth is not None else f"L{length}_R{rep}"
            samples.append(Sample(task=f"ruler/{task}", id=ident, context=context, question=spec["question"],
                                  answers=list(spec["answers"]), metric="string_match_all",
                                  max_new_tokens=spec["max_new_tokens"], prefix=spec["prefix"], chat=True,
                                  answer_prefix=spec.get("answer_prefix", ""), meta=meta))
    return samples


def _postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str], sample: Sample) -> float:
    """The share of references contained in the prediction (case-insensitive), x 100."""
    if not references:
        return 0.0
    pred = _postprocess(prediction).lower()
    return 100.0 * sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str], sample: Sample) -> float:
    """100 if any reference is contained in the prediction (case-insensitive), else 0."""
    pred = _postprocess(prediction).lower()
    return 100.0 * max((ref.lower() in pred for ref in references), default=False)


#: The metrics of the suite, by the name a sample gives in ``Sample.metric``.
METRICS: dict[str, Metric] = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def _samples(task: str, tokenizer, options, haystack) -> list[Sample]:
    return generate(task, tokenizer, lengths=options.lengths, depths=options.depths, per_cell=options.per_cell,
                    seed=options.seed, haystack=haystack(), limit=options.limit)


SUITES = [Suite("ruler", "ruler", TASKS, _samples)]
