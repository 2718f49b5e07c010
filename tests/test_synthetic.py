"""The NeedleBench- and RULER-style synthetic suites over the offline haystack, and their metrics.

Samples are built with the embedded model's real tokenizer; each check re-derives what a sample claims (its length,
where its needles are, what its answer is) from the sample's own text.
"""

import hashlib
import importlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import kvcake
from kvcake.eval.haystack import Haystack, count_tokens
from kvcake.eval.metrics import METRICS
from kvcake.eval.sample import EvalDataError, Sample
from kvcake.eval.suites import needlebench, ruler
from kvcake.needle import HAYSTACK_MODULES, haystack_paragraphs, needle_case

SUITES = [(needlebench, t) for t in needlebench.TASKS] + [(ruler, t) for t in ruler.TASKS]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvcake.models import resolve

    return AutoTokenizer.from_pretrained(resolve(None))


def one(module, task, tok, length=1000, depth=0.5, seed=0, **kw):
    return module.generate(task, tok, lengths=[length], depths=[depth], per_cell=1, seed=seed, **kw)[0]


def prompt(sample: Sample) -> str:
    return sample.prefix + sample.context + sample.question + sample.answer_prefix


# -- lengths, ids, determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("module", "task"), SUITES, ids=[f"{m.__name__.rsplit('.', 1)[1]}-{t}" for m, t in SUITES])
def test_prompt_lands_on_the_target_length(tok, module, task):
    for length in (500, 1000, 2000):
        s = one(module, task, tok, length=length)
        measured = count_tokens(tok, prompt(s))
        assert s.meta["tokens"] == measured
        assert s.meta["length"] == length
        assert abs(measured - length) <= 0.03 * length
        assert s.task == f"{module.__name__.rsplit('.', 1)[1]}/{task}"
        assert s.metric in METRICS and s.chat and s.answers and 16 <= s.max_new_tokens <= 128


def test_one_sample_per_cell_with_unique_ids(tok):
    lengths, depths = [500, 800], [0.0, 0.5, 1.0]
    for module, task in SUITES:
        samples = module.generate(task, tok, lengths=lengths, depths=depths, per_cell=2, seed=3)
        cells = len(lengths) * 2 * (1 if task in ("vt", "cwe", "fwe") else len(depths))
        assert len(samples) == cells
        assert len({s.id for s in samples}) == cells


@pytest.mark.parametrize(("module", "task"), SUITES, ids=[f"{m.__name__.rsplit('.', 1)[1]}-{t}" for m, t in SUITES])
def test_same_seed_same_samples_other_seed_other_samples(tok, module, task):
    a = module.generate(task, tok, lengths=[600], depths=[0.3], per_cell=2, seed=11)
    b = module.generate(task, tok, lengths=[600], depths=[0.3], per_cell=2, seed=11)
    c = module.generate(task, tok, lengths=[600], depths=[0.3], per_cell=2, seed=12)
    assert a == b
    assert a[0].context != a[1].context  # repetitions differ
    assert [s.context for s in a] != [s.context for s in c]
    assert [s.answers for s in a] != [s.answers for s in c]


def test_limit_keeps_the_first_samples_of_each_task(tok):
    from kvcake.eval.tasks import SuiteOptions, load_samples

    for module, task in ((needlebench, "single"), (ruler, "vt")):
        whole = module.generate(task, tok, lengths=[500, 600], depths=[0.0, 1.0], per_cell=2, seed=4)
        for limit in (1, 3, len(whole) + 1):
            assert module.generate(task, tok, lengths=[500, 600], depths=[0.0, 1.0], per_cell=2, seed=4,
                                   limit=limit) == whole[:limit]
    options = SuiteOptions(lengths=[500], depths=[0.0, 0.5, 1.0], per_cell=2, limit=2)
    samples = load_samples(["needlebench/single", "ruler/niah_single", "ruler/cwe"], tok, options)
    assert Counter(s.task for s in samples) == {"needlebench/single": 2, "ruler/niah_single": 2, "ruler/cwe": 2}


def test_samples_do_not_depend_on_the_process_hash_seed(tok):
    code = ("import hashlib, json, sys; from transformers import AutoTokenizer; from kvcake.models import resolve; "
            "from kvcake.eval.suites import needlebench, ruler; tok = AutoTokenizer.from_pretrained(resolve(None)); "
            "s = [m.generate(t, tok, lengths=[500], depths=[0.4], seed=5)[0].to_dict() "
            "for m, t in ((needlebench, 'multi_reasoning'), (ruler, 'niah_multikey'), (ruler, 'cwe'))]; "
            "print(hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest())")
    src = str(Path(kvcake.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    here = [m.generate(t, tok, lengths=[500], depths=[0.4], seed=5)[0].to_dict()
            for m, t in ((needlebench, "multi_reasoning"), (ruler, "niah_multikey"), (ruler, "cwe"))]
    assert out.stdout.strip() == hashlib.sha256(json.dumps(here, sort_keys=True).encode()).hexdigest()


# -- needles: where they are and what is asked ------------------------------------------------------------------------
def test_needlebench_single_needle_at_its_depth_and_answer_is_the_asked_fact(tok):
    patterns = []
    for t in needlebench.TEMPLATES:
        rx = re.escape(t.needle).replace(r"\{subject\}", "(?P<subject>.+?)").replace(r"\{keyword\}", "(?P<kw>.+?)")
        patterns.append((re.compile(rx + "$"), t))
    templates_seen = set()
    for depth in DEPTHS:
        for seed in range(3):
            s = one(needlebench, "single", tok, length=2000, depth=depth, seed=seed)
            needle = s.meta["needle"]
            assert s.context.count(needle) == 1
            assert abs(s.context.index(needle) / len(s.context) - depth) <= 0.1
            (m, t), = [(p.match(needle), t) for p, t in patterns if p.match(needle)]
            templates_seen.add(t.needle)
            assert s.answers == [m["kw"]]
            assert t.question.format(subject=m["subject"]) in s.question
            assert s.metric == "needlebench"
            assert needlebench.needlebench_score(f"It is {m['kw']}.", s.answers, s) == 100
    assert len(templates_seen) >= 3


def test_needlebench_multi_retrieval_asks_for_every_needle(tok):
    s = one(needlebench, "multi_retrieval", tok, length=2000, depth=0.2)
    assert len(s.answers) == 5 == len(s.meta["needles"]) and s.metric == "needlebench_multi"
    assert s.meta["depths"] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    positions = []
    for needle, keyword, depth in zip(s.meta["needles"], s.answers, s.meta["depths"], strict=True):
        assert keyword in needle and s.context.count(needle) == 1
        positions.append(s.context.index(needle) / len(s.context))
        assert abs(positions[-1] - depth) <= 0.1
    assert positions == sorted(positions)
    assert len(set(s.answers)) == 5
    three = one(needlebench, "multi_retrieval", tok, length=2000, depth=0.9, needles=3)
    assert len(three.answers) == 3 and three.meta["depths"] == pytest.approx([0.9, 1.0, 1.0])


def _relations(text: str) -> list[tuple[str, str]]:
    """(elder, younger) of every kinship sentence of NeedleBench's templates in ``text``."""
    name = r"[A-Z][a-z]+ [A-Z][a-z]+"
    pairs = []
    for template in needlebench.RELATION_TEMPLATES:
        rx = re.escape(template)
        for field in ("A", "B", "relationship"):
            group = f"(?P<{field}>{name})" if field != "relationship" else "(?P<relationship>[a-z ]+?)"
            placeholder = re.escape("{" + field + "}")
            first = rx.find(placeholder)
            if first >= 0:  # the first occurrence captures, later ones must repeat it
                rx = rx[:first] + group + rx[first + len(placeholder):].replace(placeholder, f"(?P={field})")
        for m in re.finditer(rx, text):
            pairs.append((m["A"], m["B"]))
    return pairs


def test_needlebench_multi_reasoning_answer_is_the_end_of_the_chain(tok):
    for seed, depth in ((0, 0.0), (1, 0.5), (2, 0.9), (3, 0.3)):
        s = one(needlebench, "multi_reasoning", tok, length=2000, depth=depth, seed=seed)
        assert 2 <= s.meta["hops"] <= 4
        relations = _relations(s.context)
        assert len(relations) == s.meta["hops"]
        elder = {young: old for old, young in relations}
        person = re.search(r"relative that '([^']+)'", s.question)[1]
        while person in elder:
            person = elder[person]
        assert s.answers == [person] == [s.meta["chain"][0]]
        for needle, d in zip(s.meta["needles"], s.meta["depths"], strict=True):
            assert abs(s.context.index(needle) / len(s.context) - d) <= 0.1
    assert one(needlebench, "multi_reasoning", tok, hops=3).meta["hops"] == 3


@pytest.mark.parametrize("task", ruler.DEPTH_TASKS)
def test_ruler_niah_needles_hold_the_answers_of_the_asked_keys(tok, task):
    n_keys, n_values, n_queries = ruler.NIAH_SHAPES[task]
    for depth in DEPTHS:
        s = one(ruler, task, tok, length=2000, depth=depth, seed=7)
        found = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", s.context)
        assert len(found) == n_keys * n_values
        assert len({k for k, _ in found}) == n_keys
        asked = s.meta["asked"]
        assert len(asked) == n_queries
        for key in asked:
            assert key in s.question
        for key in {k for k, _ in found} - set(asked):
            assert key not in s.question
        assert sorted(s.answers) == sorted(v for k, v in found if k in asked)
        first = s.meta["needles"][0]
        assert re.search(re.escape(s.answers[0]), first) and first in s.context
        assert abs(s.context.index(first) / len(s.context) - depth) <= 0.1
        plural = n_values * n_queries > 1
        assert ("special magic numbers" if plural else "special magic number for") in s.question
        assert s.question.endswith("mentioned in the provided text " + ("are" if plural else "is"))


def _resolve(assigned: dict[str, str], var: str) -> str:
    while var in assigned:
        var = assigned[var]
    return var


def test_ruler_vt_answer_variables_chain_to_the_value(tok):
    for length in (500, 2000):
        for seed in range(3):
            s = one(ruler, "vt", tok, length=length, seed=seed)
            value = re.search(r"assigned the value (\d+) in the text above", s.question)[1]
            assigned = {var: ref or number for var, ref, number in
                        re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))", s.context)}
            holders = {v for v in assigned if _resolve(assigned, v) == value}
            assert holders == set(s.answers) and len(holders) == 5
            assert all(f"VAR {a}" not in s.prefix for a in s.answers)  # the one-shot example uses other variables


def test_ruler_cwe_answers_are_the_ten_most_frequent_words(tok):
    for length in (500, 1000, 2000, 5000):
        s = one(ruler, "cwe", tok, length=length, seed=length)
        counts = Counter(re.findall(r"\d+\. (\S+)", s.context))
        ranked = counts.most_common()
        assert {w for w, _ in ranked[:10]} == set(s.answers) and len(s.answers) == 10
        assert ranked[9][1] > ranked[10][1]
        numbers = [int(n) for n in re.findall(r"(\d+)\. ", s.context)]
        assert numbers == list(range(1, len(numbers) + 1))
        assert not any(a in w for a in s.answers for w in counts if w != a)  # no answer hides inside another word
    assert s.meta["freq_common"] == 30 and s.meta["one_shot"]


def test_ruler_fwe_answers_are_the_three_most_frequent_coded_words(tok):
    for length in (500, 2000, 4000):
        s = one(ruler, "fwe", tok, length=length, seed=1)
        counts = Counter(w for w in s.context.split() if w != "...")
        ranked = counts.most_common()
        assert [w for w, _ in ranked[:3]] == s.answers
        assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
        assert Counter(s.context.split())["..."] > ranked[0][1]


def test_ruler_prompts_follow_the_templates(tok):
    s = one(ruler, "niah_multivalue", tok)
    assert s.prefix.startswith("Some special magic numbers are hidden within the following text.")
    assert s.question.startswith("\nWhat are all the special magic numbers for ")
    assert one(ruler, "niah_single", tok).prefix.startswith("A special magic number is hidden within the following")
    vt = one(ruler, "vt", tok)
    assert vt.question.startswith("\nQuestion: Find all variables that are assigned the value")
    assert vt.question.endswith("assigned the value " + vt.meta["value"] + " in the text above.")
    # RULER's answer prefix opens the assistant's turn: inside the user's, the models restated it and ran out of
    # vt's 30 answer tokens before the first name (every setting scored 0, the full cache too)
    assert vt.answer_prefix == ("Answer: According to the chain(s) of variable assignment in the text above, "
                                "5 variables are assigned the value " + vt.meta["value"] + ", they are: ")
    assert all(not one(ruler, t, tok).answer_prefix for t in ("niah_single", "niah_multiquery", "cwe", "fwe"))
    cwe = one(ruler, "cwe", tok)
    assert cwe.question.endswith("Answer: The top 10 words that appear most often in the list are:")
    fwe = one(ruler, "fwe", tok)
    assert fwe.prefix.startswith("Read the following coded text and track the frequency of each coded word.")
    assert {s.max_new_tokens for s in (s, vt, cwe, fwe)} == {128, 30, 120, 50}


# -- the haystack ------------------------------------------------------------------------------------------------------
def test_user_corpus_folder_and_file(tok, tmp_path):
    rng = random.Random(0)
    words = ["river", "lantern", "meadow", "harbor", "orchard", "quarry", "thicket", "glacier", "canyon", "prairie"]
    for f in range(2):
        paras = []
        for p in range(40):
            sentences = [f"The {rng.choice(words)} number {f}-{p}-{i} lies beyond the {rng.choice(words)}."
                         for i in range(rng.randint(2, 5))]
            paras.append(" ".join(sentences))
        (tmp_path / f"part{f}.txt").write_text("\n\n".join(paras) + "\n")
    (tmp_path / "ignored.md").write_text("not a text file")
    corpus = Haystack.from_path(tmp_path)
    assert len(corpus.paragraphs) == 80 and corpus.name == str(tmp_path)
    assert set(words) <= set(corpus.words())
    s = one(ruler, "niah_single", tok, length=800, haystack=corpus)
    assert abs(s.meta["tokens"] - 800) <= 24 and s.meta["haystack"] == str(tmp_path)
    filler = s.context.replace(s.meta["needles"][0], "")
    assert "lies beyond the" in filler and "not a text file" not in filler
    single = Haystack.from_path(tmp_path / "part0.txt")
    assert len(single.paragraphs) == 40
    assert one(needlebench, "single", tok, length=600, haystack=single).meta["tokens"] == pytest.approx(600, rel=0.03)


def test_bad_corpus_paths_raise_eval_data_errors(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        Haystack.from_path(tmp_path / "missing")
    with pytest.raises(EvalDataError, match="no .txt files"):
        Haystack.from_path(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(EvalDataError, match="empty"):
        Haystack.from_path(tmp_path)


def test_bad_arguments_raise_eval_data_errors(tok):
    with pytest.raises(EvalDataError, match="unknown NeedleBench task"):
        needlebench.generate("nope", tok, lengths=[500])
    with pytest.raises(EvalDataError, match="unknown RULER task"):
        ruler.generate("niah", tok, lengths=[500])
    with pytest.raises(EvalDataError, match="outside"):
        ruler.generate("niah_single", tok, lengths=[500], depths=[1.5])
    with pytest.raises(EvalDataError, match="too"):
        needlebench.generate("multi_reasoning", tok, lengths=[120])
    with pytest.raises(EvalDataError, match="too short"):
        ruler.generate("cwe", tok, lengths=[150])


def test_insert_at_sentence_boundaries():
    text = "One two. Three four. Five six.\n\nSeven eight. Nine ten."
    assert Haystack.insert(text, [(0.0, "A."), (1.0, "Z.")]) == "A. " + text + " Z."
    assert Haystack.insert(text, [(0.5, "X."), (0.5, "Y.")]) == (
        "One two. Three four. Five six. X. Y.\n\nSeven eight. Nine ten.")
    assert Haystack.insert(text, [(0.2, "M.")]).startswith("One two. M. Three four.")


def test_filler_and_words_are_deterministic(tok):
    hay = Haystack.default()
    a = hay.filler(tok, 700, random.Random(4))
    assert a == hay.filler(tok, 700, random.Random(4)) != hay.filler(tok, 700, random.Random(5))
    assert abs(count_tokens(tok, a) - 700) <= 21
    words = hay.words()
    assert words == sorted(set(words)) == Haystack.default().words() and len(words) > 1000
    assert all(re.fullmatch(r"[a-z]{4,10}", w) for w in words)
    assert hay.paragraphs[:len(haystack_paragraphs())] == tuple(haystack_paragraphs())


# -- needle.py still works as before ----------------------------------------------------------------------------------
def _old_paragraphs() -> list[str]:
    paragraphs = []
    for name in HAYSTACK_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if len(text) > 80 and ">>>" not in text:
                    paragraphs.append(text)
    return paragraphs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the old extraction touches typing.io and typing.re
def test_needle_case_is_unchanged(tok):
    old = _old_paragraphs()
    assert haystack_paragraphs() == old
    for tokens, depth, seed in ((2000, 4 / 9, 4), (1000, 0.0, 0), (1500, 1.0, 3)):
        rng = random.Random(seed)
        number = str(rng.randint(1000, 9999))
        i = start = rng.randrange(len(old))
        chosen, count = [], 0
        while count < tokens:
            chosen.append(old[i % len(old)])
            count += len(tok(old[i % len(old)], add_special_tokens=False)["input_ids"])
            i += 1
        chosen.insert(round(depth * len(chosen)), f"The special magic number is {number}.")
        case = needle_case(tok, tokens, depth, seed=seed)
        assert case.context == "\n\n".join(chosen) and start >= 0
        assert (case.question, case.answer, case.depth) == ("What is the special magic number?", number, depth)


# -- metrics -----------------------------------------------------------------------------------------------------------
def test_needlebench_metric():
    s = Sample(task="needlebench/single", id="x", context="", question="", answers=["Stardust Shard"],
               metric="needlebench", max_new_tokens=32,
               meta={"needle": "Hidden on Emerald Island is the legendary Stardust Shard."})
    score = METRICS["needlebench"]
    assert score("Stardust Shard", s.answers, s) == 100
    assert score("The legendary item hidden on Emerald Island is the Stardust Shard.", s.answers, s) == 100
    assert needlebench.levenshtein("kitten", "sitting") == 3
    assert needlebench.levenshtein("", "abc") == 3 and needlebench.levenshtein("flaw", "lawn") == 2
    near = Sample(task="needlebench/single", id="y", context="", question="", answers=["kitten"], metric="needlebench",
                  max_new_tokens=32, meta={"needle": "kit ten"})
    assert score("sit ting", near.answers, near) == pytest.approx(0.2 * 100 * (1 - 3 / 7))  # whitespace removed
    assert score("KITTEN", near.answers, near) == pytest.approx(0.2 * 100 * (1 - 6 / 6))  # case-sensitive keyword
    miss = score("Hidden on Emerald Island is the legendary Stardust Shar.", s.answers, s)
    assert miss == pytest.approx(0.2 * 100 * (1 - 1 / 49))
    multi = METRICS["needlebench_multi"]
    assert multi("Ghost Pearl, then Queen Veyla.", ["Ghost Pearl", "Queen Veyla", "Amber Lynx", "Crimson Foxes",
                                                   "black garlic"], s) == 40


def test_ruler_metrics():
    s = Sample(task="ruler/niah_multivalue", id="x", context="", question="", answers=[], metric="string_match_all",
               max_new_tokens=128)
    refs = ["1234567", "2345678", "3456789", "4567890"]
    assert METRICS["string_match_all"]("The numbers are 1234567 and 3456789.", refs, s) == 50
    assert METRICS["string_match_all"](" " + " ".join(refs) + "\n", refs, s) == 100
    assert METRICS["string_match_all"]("Answer: ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"], s) == pytest.approx(
        200 / 3)
    assert METRICS["string_match_part"]("Only 2345678 here.", refs, s) == 100
    assert METRICS["string_match_part"]("none", refs, s) == 0
    assert METRICS["string_match_all"]("nothing", [], s) == 0
