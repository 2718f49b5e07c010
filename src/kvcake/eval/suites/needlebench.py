"""NeedleBench-style tasks (OpenCompass NeedleBench): needles of fictional facts in an offline haystack.

* ``single``: one needle (a fact about a fictional place, person or thing with a distinctive keyword), at the depth.
* ``multi_retrieval``: ``needles`` facts (default 5) at depths ``d, d + 0.1, d + 0.2, ...`` (capped at 1), as
  NeedleBench spaces its needles ``diff = 10%`` apart; the question asks for all of them.
* ``multi_reasoning``: a chain of 2-4 kinship relations (NeedleBench v2's templates), shuffled and placed the same
  way; the question asks for the eldest relative the last person of the chain can trace back to.

The prompt follows NeedleBench v2 (``opencompass/datasets/needlebench_v2/origin.py``), the fact and question
templates its ``needles.jsonl`` style. Scoring follows OpenCompass: ``needlebench`` (NeedleBenchOriginEvaluator of
NeedleBench v1: 100 if the keyword is in the prediction, else 0.2 x the Levenshtein similarity of the prediction to
the needle, whitespace removed) and ``needlebench_multi`` (NeedleBenchParallelEvaluator: the share of keywords found).
Keyword matches are case-sensitive, as there.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvcake.eval.haystack import Haystack, seeded
from kvcake.eval.sample import EvalDataError, Metric, Sample
from kvcake.eval.suites import Suite

TASKS = ("single", "multi_retrieval", "multi_reasoning")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_NEEDLES = 40
SPACING = 0.1  # NeedleBench's ``diff``: the distance between consecutive needles, as a share of the context

PREFIX = ("This is a test of long-text capability. You need to first read the long document below, and then answer "
          "the final question based on the information in the document.\nThe content of the long document is as "
          "follows\n\n<Document>\n")
PREFIX_MULTI = PREFIX.replace("answer the final question", "answer the final questions one by one")
ASK = "\n</Document>\n\nBased on the information in the document, now please answer: "

_ADJ = ("Stardust", "Ghost", "Dream", "Crystal", "Thunder", "Ember", "Frost", "Velvet", "Obsidian", "Phantom",
        "Sapphire", "Whispering", "Golden", "Celestial", "Twilight", "Moonlit")
_THING = ("Shard", "Pearl", "Bubble", "Essence", "Crown", "Lantern", "Compass", "Chalice", "Feather", "Mirror",
          "Amulet", "Scroll", "Orb", "Harp")
_ISLANDS = ("Emerald", "Sand", "Coral", "Misty", "Heaven", "Mythical", "Cobalt", "Amber", "Driftwood", "Saffron",
            "Ivory", "Juniper", "Marigold", "Pebble", "Thistle", "Willow")
_STARS = ("Alpha Bot", "Polaris", "Vega Prime", "Kepler Nine", "Draco Minor", "Sirius Delta", "Orion Gate",
          "Lyra Seven", "Cygnus Reach", "Altair Minor", "Rigel Vast", "Tau Ceti")
_TITLES = ("Queen", "King", "Empress", "Emperor", "Regent", "Archduke")
_RULERS = ("Zambot", "Mirelda", "Orvane", "Kastor", "Ysolde", "Tharion", "Veyla", "Brannoch", "Quillon", "Seraphine",
           "Dorrik", "Azhar")
_WORLDS = ("Titan", "Europa", "Mars", "Ganymede", "Callisto", "Enceladus", "Triton", "Phobos", "Ceres", "Venus",
           "Mercury", "the Moon")
_BAND_ADJ = ("Virtual", "Neon", "Electric", "Crimson", "Hollow", "Atomic", "Silent", "Paper", "Cosmic", "Rusty")
_BAND_NOUN = ("Rocket Band", "Otters", "Lanterns", "Comets", "Foxes", "Echoes", "Pilots", "Tigers")
_CHEFS = ("Marta Quell", "Ollie Brandt", "Inez Farrow", "Bruno Tallis", "Hana Okoro", "Leif Amsel", "Petra Voss",
          "Tobias Wren")
_DISHES = ("lemon tart", "mushroom stew", "pepper soup", "plum pie", "barley bread", "fish curry", "onion galette",
           "walnut cake")
_INGREDIENTS = ("smoked cardamom", "burnt honey", "black garlic", "pickled rose petals", "toasted fennel",
                "candied ginger", "saffron butter", "sour cherries", "roasted chestnuts", "sea fennel")
_CITIES = ("Brightwater", "Stonehaven", "Port Velmar", "Ashford Vale", "Glimmerdeep", "Kestrel Bay", "Windmere",
           "Duskhollow", "Larkspur Hill", "Fernmoor")
_COLOURS = ("Crimson", "Silver", "Indigo", "Amber", "Jade", "Scarlet", "Cobalt", "Ivory")
_ANIMALS = ("Falcon", "Badger", "Heron", "Lynx", "Otter", "Raven", "Stag", "Viper")


@dataclass(frozen=True)
class Template:
    needle: str      # the fact, with {subject} and {keyword}
    question: str    # the retrieval question
    form: str        # NeedleBench's "Please answer in the format '...'" sentence, with ____ for the keyword
    subjects: tuple[str, ...]
    keywords: tuple[str, ...]


TEMPLATES = (
    Template("Hidden on {subject} Island is the legendary {keyword}.", "What legendary item is hidden on {subject} "
             "Island?", "The legendary item hidden on {subject} Island is ____.", _ISLANDS,
             tuple(f"{a} {t}" for a in _ADJ for t in _THING)),
    Template("The ruler of the {subject} star system is {keyword}.", "Who is the ruler of the {subject} star system?",
             "The ruler of the {subject} star system is ____.", _STARS,
             tuple(f"{t} {r}" for t in _TITLES for r in _RULERS)),
    Template("The first band to play on {subject} was the {keyword}.", "Which band was the first to play on "
             "{subject}?", "The first band to play on {subject} was the ____.", _WORLDS,
             tuple(f"{a} {n}" for a in _BAND_ADJ for n in _BAND_NOUN)),
    Template("The secret ingredient of {subject} is {keyword}.", "What is the secret ingredient of {subject}?",
             "The secret ingredient of {subject} is ____.", tuple(f"{c}'s famous {d}" for c in _CHEFS for d in _DISHES),
             _INGREDIENTS),
    Template("The password to the old vault beneath {subject} is {keyword}.", "What is the password to the old vault "
             "beneath {subject}?", "The password to the old vault beneath {subject} is ____.", _CITIES,
             tuple(f"{c} {a}" for c in _COLOURS for a in _ANIMALS)),
)

#: NeedleBench v2 (``needlebench_v2/atc.py``): kinship templates, A the elder of B.
RELATION_TEMPLATES = (
    "{A} is {B}'s {relationship}.",
    "{B}'s {relationship} is {A}.",
    "{A}, as {B}'s {relationship}, has a significant impact on {B}'s upbringing.",
    "{A} is not only {B}'s {relationship} but also {B}'s role model.",
    "{B} is the child of {A}.",
    "For {B}, {A} is not just a {relationship}, but also a friend.",
    "For {B}, {A} is more than just a {relationship}; {A} is a lifelong mentor of {B}.",
)
RELATION_TERMS = ("father", "mother", "dad", "mom", "grandfather", "grandmother", "maternal grandmother",
                  "maternal grandfather", "paternal grandfather", "paternal grandmother")
_FIRST = ("Nora", "Arthur", "Shelley", "Yusuf", "Beatrix", "Jeff", "Kevin", "Susan", "Michael", "Laura", "Oscar",
          "Priya", "Tomas", "Elena", "Victor", "Nadia", "Henry", "Grace", "Ivan", "Maya", "Felix", "Clara", "Rafael",
          "Ingrid", "Samuel", "Leah", "Marcus", "Hannah", "Diego", "Ruth")
_LAST = ("Ashby", "Lowell", "Whitaker", "Quint", "White", "Mills", "Fletcher", "Scott", "Baker", "Carter", "Reyes",
         "Novak", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Petrov", "Haddad", "Kowalski", "Brennan", "Silva",
         "Duarte", "Hughes", "Park", "Schmidt", "Rossi", "Nguyen", "Murphy", "Adler", "Carver")
REASONING_NOTES = (
    "\n\nFor example:\nExample 1: If James Hill's father is Jasmine Lane, and no further information about familial "
    "relationships is provided in the text, then the oldest relative James Hill can trace back to in the provided "
    "text is Jasmine Lane.\nExample 2: If Andrew Williams's grandmother is Dan Newton, and Dan Newton's father is "
    "James Hill, and no further information about familial relationships is provided in the text, then the oldest "
    "relative Andrew Williams can trace back to in the provided text is James Hill.\n\nNotes:\n1. You do not need to "
    "worry about the gender consistency of names in this test. Our primary focus is on who is older.\n2. Ignore "
    "surname inheritance issues. We only care about who is older.\n3. Answer with the name of that relative."
)


def _facts(rng: random.Random, k: int) -> list[tuple[str, str, str, str]]:
    """``k`` facts with distinct subjects and keywords: (needle, question, answer format, keyword)."""
    order = list(range(len(TEMPLATES)))
    rng.shuffle(order)
    used: set[str] = set()
    facts = []
    for i in range(k):
        t = TEMPLATES[order[i % len(order)]]
        subject = rng.choice([s for s in t.subjects if s not in used])
        keyword = rng.choice([w for w in t.keywords if w not in used])
        used |= {subject, keyword}
        facts.append((t.needle.format(subject=subject, keyword=keyword), t.question.format(subject=subject),
                      t.form.format(subject=subject), keyword))
    return facts


def _spread(depth: float, k: int) -> list[float]:
    return [min(1.0, depth + SPACING * i) for i in range(k)]


def _single(rng: random.Random, depth: float) -> dict:
    needle, question, form, keyword = _facts(rng, 1)[0]
    return {"prefix": PREFIX, "needles": [(depth, needle)], "answers": [keyword], "metric": "needlebench",
            "max_new_tokens": 32, "question": f"{ASK}{question} Please answer in the format '{form}'\n",
            "meta": {"needle": needle}}


def _multi_retrieval(rng: random.Random, depth: float, needles: int) -> dict:
    facts = _facts(rng, needles)
    questions = " ".join(f[1] for f in facts)
    forms = " ".join(f[2] for f in facts)
    return {"prefix": PREFIX_MULTI, "needles": list(zip(_spread(depth, needles), (f[0] for f in facts), strict=True)),
            "answers": [f[3] for f in facts], "metric": "needlebench_multi", "max_new_tokens": 16 + 16 * needles,
            "question": f"{ASK}{questions} Please answer in the format of '{forms}'\n",
            "meta": {"needles": [f[0] for f in facts]}}


def _multi_reasoning(rng: random.Random, depth: float, hops: int | None) -> dict:
    hops = hops if hops is not None else rng.randint(2, 4)
    if not 1 <= hops <= min(len(_FIRST), len(_LAST)) - 1:
        raise EvalDataError(f"multi_reasoning needs 1 to {min(len(_FIRST), len(_LAST)) - 1} hops, not {hops}")
    names = [f"{a} {b}" for a, b in zip(rng.sample(_FIRST, hops + 1), rng.sample(_LAST, hops + 1), strict=True)]
    relations = [rng.choice(RELATION_TEMPLATES).format(A=names[i], B=names[i + 1],
                                                        relationship=rng.choice(RELATION_TERMS))
                 for i in range(hops)]
    rng.shuffle(relations)
    last = names[-1]
    question = (f"Given the context described above, who is the eldest relative that '{last}' can trace back to in "
                "the context?")
    return {"prefix": PREFIX, "needles": list(zip(_spread(depth, hops), relations, strict=True)), "answers": [names[0]],
            "metric": "needlebench", "max_new_tokens": 48, "question": f"{ASK}{question}{REASONING_NOTES}\n",
            "meta": {"chain": names, "hops": hops, "needles": relations}}


def generate(task: str, tokenizer, *, lengths: Sequence[int], depths: Sequence[float] = DEPTHS, per_cell: int = 1,
             seed: int = 0, haystack: Haystack | None = None, needles: int = 5,
             hops: int | None = None, limit: int | None = None) -> list[Sample]:
    """One sample per (length, depth, repetition): prompts of about ``length`` tokens (prefix, context and question,
    measured with ``tokenizer``), the (first) needle at relative ``depth``. ``needles`` is the number of facts of
    ``multi_retrieval``; ``hops`` the length of the ``multi_reasoning`` chain (default: random, 2 to 4).
    ``limit`` keeps the first ``limit`` samples of that order (the same samples as without it)."""
    if task not in TASKS:
        raise EvalDataError(f"unknown NeedleBench task {task!r}; known: {', '.join(TASKS)}")
    if per_cell < 1 or any(int(n) <= 0 for n in lengths):
        raise EvalDataError("lengths and per_cell must be positive")
    if not 1 <= needles <= MAX_NEEDLES:
        raise EvalDataError(f"multi_retrieval takes 1 to {MAX_NEEDLES} needles, not {needles}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalDataError(f"depth {d} is outside [0, 1]")
    haystack = haystack or Haystack.default()
    samples: list[Sample] = []
    for length in lengths:
        for depth in depths:
            for rep in range(per_cell):
                if limit is not None and len(samples) >= limit:
                    return samples
                rng = seeded(seed, "needlebench", task, length, float(depth), rep)
                if task == "single":
                    spec = _single(rng, depth)
                elif task == "multi_retrieval":
                    spec = _multi_retrieval(rng, depth, needles)
                else:
                    spec = _multi_reasoning(rng, depth, hops)
                context, measured = haystack.context(tokenizer, int(length), rng, needles=spec["needles"],
                                                     prefix=spec["prefix"], question=spec["question"])
                meta = {"length": int(length), "tokens": measured, "depth": float(depth),
                        "depths": [d for d, _ in spec["needles"]], "haystack": haystack.name, **spec["meta"]}
                samples.append(Sample(task=f"needlebench/{task}", id=f"L{length}_D{depth:g}_R{rep}", context=context,
                                      question=spec["question"], answers=spec["answers"], metric=spec["metric"],
                                      max_new_tokens=spec["max_new_tokens"], prefix=spec["prefix"], chat=True,
                                      meta=meta))
    return samples


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def needlebench_score(prediction: str, references: list[str], sample: Sample) -> float:
    """100 if a reference keyword is in the prediction; else 0.2 x 100 x (1 - edit distance / longer length) between
    the prediction and the needle (``sample.meta["needle"]``, else the first reference), whitespace removed."""
    if any(ref in prediction for ref in references):
        return 100.0
    meta = getattr(sample, "meta", None) or {}
    needle = meta.get("needle") or (references[0] if references else "")
    pred, ref = re.sub(r"\s+", "", prediction), re.sub(r"\s+", "", needle)
    longest = max(len(pred), len(ref))
    similarity = 100.0 * (1 - levenshtein(pred, ref) / longest) if longest else 100.0
    return 0.2 * similarity


def needlebench_multi_score(prediction: str, references: list[str], sample: Sample) -> float:
    """The share of reference keywords found in the prediction, x 100."""
    if not references:
        return 0.0
    return 100.0 * sum(ref in prediction for ref in references) / len(references)


#: The metrics of the suite, by the name a sample gives in ``Sample.metric``.
METRICS: dict[str, Metric] = {"needlebench": needlebench_score, "needlebench_multi": needlebench_multi_score}


def _samples(task: str, tokenizer, options, haystack) -> list[Sample]:
    return generate(task, tokenizer, lengths=options.lengths, depths=options.depths, per_cell=options.per_cell,
                    seed=options.seed, haystack=haystack(), limit=options.limit)


SUITES = [Suite("needlebench", "needlebench", TASKS, _samples)]
