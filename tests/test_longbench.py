"""LongBench: the task table against the official configs, the loader, and the official metrics on known cases."""

import json
import sys
import zipfile
from pathlib import Path

import pytest
from rouge import Rouge

from kvcake.eval.metrics import METRICS
from kvcake.eval.sample import EvalDataError, Sample
from kvcake.eval.suites import longbench, longbench_metrics

MULTI_NEWS = Path("/work/shared/data/longbench/multi_news.jsonl")
# config/dataset2prompt.json of THUDM/LongBench, verbatim
OFFICIAL_MULTI_NEWS = (
    "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
    "Now, write a one-page summary of all the news.\n\nSummary:"
)
# config/dataset2maxlen.json and dataset2metric of eval.py
OFFICIAL = {
    "narrativeqa": (128, "qa_f1"), "qasper": (128, "qa_f1"), "multifieldqa_en": (64, "qa_f1"),
    "multifieldqa_zh": (64, "qa_f1_zh"), "hotpotqa": (32, "qa_f1"), "2wikimqa": (32, "qa_f1"),
    "musique": (32, "qa_f1"), "dureader": (128, "rouge_zh"), "gov_report": (512, "rouge"), "qmsum": (512, "rouge"),
    "multi_news": (512, "rouge"), "vcsum": (512, "rouge_zh"), "trec": (64, "classification"),
    "triviaqa": (32, "qa_f1"), "samsum": (128, "rouge"), "lsht": (64, "classification"),
    "passage_count": (32, "count"), "passage_retrieval_en": (32, "retrieval"),
    "passage_retrieval_zh": (32, "retrieval_zh"), "lcc": (64, "code_sim"), "repobench-p": (64, "code_sim"),
}
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
TREC_CLASSES = ["Abbreviation", "Description", "Entity", "Human", "Location", "Numeric value"]


def _sample(metric, answers, **meta):
    return Sample(task="longbench/x", id="0", context="", question="", answers=answers, metric=metric,
                  max_new_tokens=8, meta=meta)


def _score(metric, prediction, answers, **meta):
    return METRICS[metric](prediction, answers, _sample(metric, answers, **meta))


def _record(i, **fields):
    record = {"input": f"question {i}", "context": f"context {i}", "answers": ["Location"], "length": 10 + i,
              "dataset": "trec", "language": "en", "all_classes": TREC_CLASSES, "_id": f"id{i}"}
    record.update(fields)
    return record


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- the task table -----------------------------------------------------------------------------------------------


def test_task_table_matches_the_official_configs():
    assert len(longbench.TASKS_EN) == 16 and len(longbench.TASKS_ZH) == 5
    assert set(longbench.TASKS_EN) | set(longbench.TASKS_ZH) == set(longbench.TASKS) == set(OFFICIAL)
    for name, spec in longbench.TASKS.items():
        assert (spec.max_new_tokens, spec.metric) == OFFICIAL[name], name
        assert spec.chat == (name not in NO_CHAT), name
        assert spec.first_line_only == (name in FIRST_LINE), name
        assert spec.template.count("{context}") == 1, name
        assert spec.metric in METRICS, name
    assert longbench.TASKS["multi_news"].template == OFFICIAL_MULTI_NEWS
    assert "asconcisely as you can" in longbench.TASKS["narrativeqa"].template  # the official typo, kept


def test_every_template_splits_into_the_official_prompt():
    record = {"context": "CTX", "input": "INP"}
    for name, spec in longbench.TASKS.items():
        sample = longbench.to_sample(spec, {**record, "answers": ["Paragraph 1"]}, "1")
        assert sample.prefix + sample.context + sample.question == spec.template.format(**record), name
        assert "query_in_prefix" not in sample.meta


# ---- metrics ------------------------------------------------------------------------------------------------------


def test_all_metrics_are_registered():
    assert set(longbench_metrics.PER_REFERENCE) <= set(METRICS)


def test_qa_f1():
    # "cat sat" vs "cat sat down": P = 1, R = 2/3, F1 = 0.8
    assert _score("qa_f1", "The cat sat", ["a cat sat down"]) == pytest.approx(80.0)
    assert _score("qa_f1", "Paris!", ["paris"]) == pytest.approx(100.0)
    assert _score("qa_f1", "the", ["an"]) == 0.0  # both normalise to nothing
    assert _score("qa_f1", "cat sat", ["dog", "The cat sat."]) == pytest.approx(100.0)  # best reference
    assert _score("qa_f1", "cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5 * 100)  # multiset overlap
    assert _score("qa_f1", "anything", []) == 0.0


def test_first_line_only_cut():
    assert longbench_metrics.first_line("\n\nParis\nLondon") == "Paris"
    # uncut: "paris london is answer" vs "paris": P = 1/4, R = 1, F1 = 0.4
    assert _score("qa_f1", "\nParis\nLondon is the answer", ["Paris"]) == pytest.approx(40.0)
    assert _score("qa_f1", "\nParis\nLondon is the answer", ["Paris"], first_line_only=True) == pytest.approx(100.0)


def test_classification():
    classes = ["Loc", "Location", "Num"]
    # "Loc" is also found in the prediction but is a substring of the answer, so it is dropped
    assert _score("classification", "Location", ["Location"], all_classes=classes) == 100.0
    assert _score("classification", "Num or Location", ["Location"], all_classes=classes) == 50.0
    assert _score("classification", "Num", ["Location"], all_classes=classes) == 0.0
    assert _score("classification", "nothing", ["Location"], all_classes=classes) == 0.0
    # LongBench removes from the list while iterating it, so "b" is skipped and stays: 1/2, not 1
    assert _score("classification", "ab", ["ab"], all_classes=["a", "b", "ab"]) == 50.0
    assert _score("classification", "Human", ["Human"], all_classes=TREC_CLASSES, first_line_only=True) == 100.0
    with pytest.raises(EvalDataError, match="all_classes"):
        _score("classification", "Human", ["Human"])


def test_retrieval_and_count():
    assert _score("retrieval", "Paragraph 3", ["Paragraph 3"]) == 100.0
    assert _score("retrieval", "Paragraph 3 and Paragraph 5", ["Paragraph 3"]) == 50.0
    assert _score("retrieval", "Paragraph 30", ["Paragraph 3"]) == 0.0
    assert _score("retrieval", "no idea", ["Paragraph 3"]) == 0.0
    assert _score("retrieval_zh", "段落3", ["段落3"]) == 100.0
    assert _score("retrieval_zh", "段落3和段落12", ["段落3"]) == 50.0
    assert _score("count", "There are 7 unique paragraphs.", ["7"]) == 100.0
    assert _score("count", "7 or 8, maybe 17", ["7"]) == pytest.approx(100 / 3)
    assert _score("count", "seven", ["7"]) == 0.0
    with pytest.raises(EvalDataError, match="Paragraph"):
        _score("retrieval", "Paragraph 3", ["3"])


def test_code_sim():
    assert longbench_metrics.fuzz_ratio("", "") == 100
    assert longbench_metrics.fuzz_ratio("", "x") == 0
    assert _score("code_sim", "x = foo(1)", ["x = foo(1)"]) == 100.0
    assert _score("code_sim", "# set x\n// or this\nx = foo(1)\ny = 2", ["x = foo(1)"]) == 100.0
    assert _score("code_sim", "\n\n```python\nx = foo(1)", ["x = foo(1)"]) == 100.0
    assert _score("code_sim", "abcd", ["abce"]) == 75.0  # difflib ratio 2*3/8
    assert _score("code_sim", "x = 1  # comment", ["x = 1"]) == 0.0  # every line has '#': the empty line is compared
    assert _score("code_sim", "qqqq", ["zzzz"]) == 0.0


def test_rouge():
    assert _score("rouge", "the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0, abs=1e-5)
    assert _score("rouge", "alpha beta", ["gamma delta"]) == pytest.approx(0.0, abs=1e-6)
    assert _score("rouge", "", ["gamma delta"]) == 0.0  # the rouge package raises on an empty hypothesis
    assert _score("rouge", "...", ["gamma delta"]) == 0.0
    prediction, reference = "the cat sat on a red mat. It slept.", "A cat sat on the mat. The cat then slept."
    expected = Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    assert 0 < expected < 1
    assert _score("rouge", prediction, [reference]) == pytest.approx(100 * expected)


def test_chinese_metrics_explain_a_missing_jieba(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    for metric in ("qa_f1_zh", "rouge_zh"):
        with pytest.raises(ImportError, match="pip install jieba"):
            _score(metric, "北京", ["北京"])


# ---- the loader on the real multi_news file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_news():
    if not MULTI_NEWS.is_file():
        pytest.skip(f"{MULTI_NEWS} is absent")
    records = [json.loads(line) for line in MULTI_NEWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records, longbench.load("multi_news", MULTI_NEWS.parent)


def test_multi_news_samples(multi_news):
    records, samples = multi_news
    assert len(samples) == len(records) == 200
    for record, sample in zip(records, samples, strict=True):
        assert sample.prefix + sample.context + sample.question == OFFICIAL_MULTI_NEWS.format(**record)
        assert sample.context == record["context"]
        assert (sample.task, sample.id, sample.answers) == ("longbench/multi_news", record["_id"], record["answers"])
        assert (sample.metric, sample.max_new_tokens, sample.chat) == ("rouge", 512, True)
        assert sample.meta["length"] == record["length"] and sample.meta["first_line_only"] is False
        assert sample.meta["language"] == "en"
    assert len({s.id for s in samples}) == 200
    assert [s.id for s in longbench.load("longbench/multi_news", MULTI_NEWS.parent, limit=3)] == [
        s.id for s in samples[:3]
    ]


def test_multi_news_scores(multi_news):
    _, samples = multi_news
    for sample in samples:
        assert METRICS["rouge"](sample.answers[0], sample.answers, sample) == pytest.approx(100.0, abs=1e-5)
    prediction = "Police said protesters in the park would not be evicted tonight."
    rouge = Rouge()
    for sample in samples[:50]:
        expected = max(rouge.get_scores([prediction], [ref], avg=True)["rouge-l"]["f"] for ref in sample.answers)
        assert METRICS["rouge"](prediction, sample.answers, sample) == pytest.approx(100 * expected)


# ---- the loader on made-up files ----------------------------------------------------------------------------------


def test_load_from_zip_and_nested_folder(tmp_path):
    records = [_record(i) for i in range(3)]
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/trec.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    nested = tmp_path / "LongBench"
    _write_jsonl(nested / "data" / "trec.jsonl", records)
    for source in (archive, str(archive), tmp_path, nested):
        samples = longbench.load("trec", source)
        assert [s.id for s in samples] == ["id0", "id1", "id2"], source
    sample = longbench.load("trec", archive, limit=1)[0]
    assert sample.prefix == "Please determine the type of the question below. Here are some examples of questions.\n\n"
    assert (sample.context, sample.question) == ("context 0", "\nquestion 0")
    assert (sample.chat, sample.metric, sample.max_new_tokens) == (False, "classification", 64)
    assert sample.meta == {"length": 10, "all_classes": TREC_CLASSES, "first_line_only": True, "language": "en"}
    assert METRICS["classification"]("Location\nHuman", sample.answers, sample) == 100.0


def test_repobench_input_goes_in_the_question(tmp_path):
    _write_jsonl(tmp_path / "repobench-p.jsonl", [_record(0, input="import os\n", answers=["x = 1"])])
    sample = longbench.load("repobench-p", tmp_path)[0]
    assert sample.prefix == "Please complete the code given below. \n"
    assert sample.question == "import os\nNext line of code:\n"
    assert sample.chat is False


def test_empty_lines_skipped_and_id_falls_back_to_the_line_number(tmp_path):
    record = _record(0)
    del record["_id"]
    path = tmp_path / "trec.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n\n  \n", encoding="utf-8")
    assert [s.id for s in longbench.load("trec", tmp_path)] == ["2"]


def test_missing_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(EvalDataError, match="data.zip") as err:
        longbench.load("hotpotqa", missing)
    assert str(missing) in str(err.value) and "THUDM/LongBench" in str(err.value)
    with pytest.raises(EvalDataError, match="hotpotqa.jsonl"):
        longbench.load("hotpotqa", tmp_path)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/trec.jsonl", "")
    with pytest.raises(EvalDataError, match="no data/hotpotqa.jsonl"):
        longbench.load("hotpotqa", archive)
    (tmp_path / "junk.zip").write_text("not a zip")
    with pytest.raises(EvalDataError, match="not a valid zip"):
        longbench.load("hotpotqa", tmp_path / "junk.zip")


def test_unknown_task(tmp_path):
    with pytest.raises(EvalDataError, match="unknown LongBench task 'hotpot'.*hotpotqa"):
        longbench.load("hotpot", tmp_path)


def test_malformed_line(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n\n" + '{"input": "x", \n', encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"trec\.jsonl:3: malformed JSON"):
        longbench.load("trec", tmp_path)


@pytest.mark.parametrize("field", ["answers", "context", "input", "all_classes"])
def test_missing_field(tmp_path, field):
    broken = _record(1)
    del broken[field]
    _write_jsonl(tmp_path / "trec.jsonl", [_record(0), broken])
    with pytest.raises(EvalDataError, match=rf"trec\.jsonl:2: record has no field '{field}'"):
        longbench.load("trec", tmp_path)


def test_bad_field_types(tmp_path):
    _write_jsonl(tmp_path / "trec.jsonl", [_record(0, answers="Location")])
    with pytest.raises(EvalDataError, match="'answers' must be a list of strings"):
        longbench.load("trec", tmp_path)
    _write_jsonl(tmp_path / "trec.jsonl", [[1, 2]])
    with pytest.raises(EvalDataError, match="trec.jsonl:1: expected a JSON object"):
        longbench.load("trec", tmp_path)
