"""LongBench (v1): the official prompt templates, generation lengths, metrics and chat rule per task, and a loader.

The facts come from THUDM/LongBench: ``config/dataset2prompt.json``, ``config/dataset2maxlen.json``, the
``dataset2metric`` table and first-line cut of ``eval.py``, and the no-chat-template list of ``pred.py``. The data
is LongBench's ``data.zip`` (``data/{task}.jsonl``), from the THUDM/LongBench dataset on Hugging Face.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcake.eval.sample import EvalDataError, Sample
from kvcake.eval.suites import Suite

DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
REQUIRED_FIELDS = ("input", "context", "answers")


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    template: str          # official prompt, with {context} and possibly {input}
    max_new_tokens: int    # official maximum generation length
    metric: str            # a name in kvcake.eval.suites.longbench_metrics.METRICS
    language: str          # "en" or "zh"
    chat: bool = True      # pred.py wraps the prompt in the chat template
    first_line_only: bool = False  # eval.py scores only the first line of the prediction


_QA_MULTI_DOC = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
_NARRATIVEQA_RULES = "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
_CODE = "Please complete the code given below. \n"

_TASKS = (
    LongBenchTask(
        "narrativeqa",
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        + _NARRATIVEQA_RULES
        + "\n\nStory: {context}\n\nNow, answer the question based on the story "
        + _NARRATIVEQA_RULES
        + "\n\nQuestion: {input}\n\nAnswer:",
        128, "qa_f1", "en",
    ),
    LongBenchTask(
        "qasper",
        "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
        + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULES
        + "\n\nQuestion: {input}\n\nAnswer:",
        128, "qa_f1", "en",
    ),
    LongBenchTask(
        "multifieldqa_en",
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, "qa_f1", "en",
    ),
    LongBenchTask(
        "multifieldqa_zh",
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        64, "qa_f1_zh", "zh",
    ),
    LongBenchTask("hotpotqa", _QA_MULTI_DOC, 32, "qa_f1", "en"),
    LongBenchTask("2wikimqa", _QA_MULTI_DOC, 32, "qa_f1", "en"),
    LongBenchTask("musique", _QA_MULTI_DOC, 32, "qa_f1", "en"),
    LongBenchTask(
        "dureader",
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        128, "rouge_zh", "zh",
    ),
    LongBenchTask(
        "gov_report",
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, "rouge", "en",
    ),
    LongBenchTask(
        "qmsum",
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512, "rouge", "en",
    ),
    LongBenchTask(
        "multi_news",
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512, "rouge", "en",
    ),
    LongBenchTask(
        "vcsum",
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        512, "rouge_zh", "zh",
    ),
    LongBenchTask(
        "trec",
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64, "classification", "en", chat=False, first_line_only=True,
    ),
    LongBenchTask(
        "triviaqa",
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32, "qa_f1", "en", chat=False, first_line_only=True,
    ),
    LongBenchTask(
        "samsum",
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128, "rouge", "en", chat=False, first_line_only=True,
    ),
    LongBenchTask(
        "lsht",
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
        64, "classification", "zh", chat=False, first_line_only=True,
    ),
    LongBenchTask(
        "passage_count",
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, "
        "2, 3, and so on.\n\nThe final answer is: ",
        32, "count", "en",
    ),
    LongBenchTask(
        "passage_retrieval_en",
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.'
        "\n\nThe answer is: ",
        32, "retrieval", "en",
    ),
    LongBenchTask(
        "passage_retrieval_zh",
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        32, "retrieval_zh", "zh",
    ),
    LongBenchTask("lcc", _CODE + "{context}Next line of code:\n", 64, "code_sim", "en", chat=False),
    LongBenchTask("repobench-p", _CODE + "{context}{input}Next line of code:\n", 64, "code_sim", "en", chat=False),
)

TASKS: dict[str, LongBenchTask] = {task.name: task for task in _TASKS}
TASKS_EN: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
TASKS_ZH: tuple[str, ...] = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")


def task(name: str) -> LongBenchTask:
    """The spec of LongBench task ``name`` (e.g. "hotpotqa"; a "longbench/" prefix is accepted)."""
    name = name.removeprefix("longbench/")
    if name not in TASKS:
        raise EvalDataError(f"unknown LongBench task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def split_template(template: str) -> tuple[str, str]:
    """The template's text before and after ``{context}``."""
    if template.count("{context}") != 1:
        raise ValueError(f"a LongBench template needs exactly one {{context}}: {template!r}")
    before, after = template.split("{context}")
    return before, after


def _no_data(where: Path, name: str) -> EvalDataError:
    return EvalDataError(
        f"LongBench data for {name!r} not found at {where} (looked for {name}.jsonl, data/{name}.jsonl, data.zip). "
        f"Get LongBench's data.zip from the THUDM/LongBench dataset on Hugging Face ({DATA_URL}) and extract it "
        "(or pass the zip itself)."
    )


def _zip_lines(archive: Path, name: str) -> tuple[str, list[str]]:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = set(zf.namelist())
            for member in (f"data/{name}.jsonl", f"{name}.jsonl"):
                if member in members:
                    return f"{archive}:{member}", zf.read(member).decode("utf-8").split("\n")
    except zipfile.BadZipFile as exc:
        raise EvalDataError(f"{archive} is not a valid zip file: {exc}") from exc
    raise EvalDataError(
        f"{archive} has no data/{name}.jsonl; is it LongBench's data.zip? Get it from the THUDM/LongBench dataset "
        f"on Hugging Face ({DATA_URL})."
    )


def _lines(data: Path, name: str) -> tuple[str, list[str]]:
    if data.is_file():
        return _zip_lines(data, name)
    if not data.is_dir():
        raise _no_data(data, name)
    for candidate in (data / f"{name}.jsonl", data / "data" / f"{name}.jsonl"):
        if candidate.is_file():
            return str(candidate), candidate.read_text(encoding="utf-8").split("\n")
    if (data / "data.zip").is_file():
        return _zip_lines(data / "data.zip", name)
    raise _no_data(data, name)


def _records(where: str, lines: list[str], spec: LongBenchTask) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{where}:{lineno}: malformed JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}:{lineno}: expected a JSON object, got {type(record).__name__}")
        required = REQUIRED_FIELDS + (("all_classes",) if spec.metric == "classification" else ())
        for key in required:
            if record.get(key) is None:
                raise EvalDataError(f"{where}:{lineno}: record has no field {key!r}")
        for key in ("input", "context"):
            if not isinstance(record[key], str):
                raise EvalDataError(f"{where}:{lineno}: field {key!r} must be a string")
        answers = record["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise EvalDataError(f"{where}:{lineno}: field 'answers' must be a list of strings")
        yield lineno, record


def to_sample(spec: LongBenchTask, record: dict[str, Any], fallback_id: str) -> Sample:
    """One LongBench record as a Sample whose ``prefix + context + question`` is the official prompt."""
    before, after = split_template(spec.template)
    meta: dict[str, Any] = {
        "length": record.get("length"),
        "all_classes": record.get("all_classes"),
        "first_line_only": spec.first_line_only,
        "language": record.get("language") or spec.language,
    }
    if "{input}" in before:
        meta["query_in_prefix"] = True
    return Sample(
        task=f"longbench/{spec.name}",
        id=str(record.get("_id") or fallback_id),
        context=record["context"],
        question=after.format(input=record["input"]),
        answers=list(record["answers"]),
        metric=spec.metric,
        max_new_tokens=spec.max_new_tokens,
        prefix=before.format(input=record["input"]),
        chat=spec.chat,
        meta=meta,
    )


def load(task_name: str, data: str | Path, limit: int | None = None) -> list[Sample]:
    """Samples of LongBench task ``task_name`` from ``data``: a folder with ``{task}.jsonl`` or ``data/{task}.jsonl``
    (or ``data.zip``), or LongBench's ``data.zip`` itself. ``limit`` keeps the first ``limit`` records."""
    spec = task(task_name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    where, lines = _lines(Path(data).expanduser(), spec.name)
    samples: list[Sample] = []
    for lineno, record in _records(where, lines, spec):
        if limit is not None and len(samples) >= limit:
            break
        samples.append(to_sample(spec, record, str(lineno)))
    return samples


def _samples(task: str, tokenizer, options, haystack) -> list[Sample]:
    _check(task, options)
    return load(task, options.data, limit=options.limit)


def _check(task: str, options) -> None:
    if options.data is None:
        raise EvalDataError(f"longbench/{task} needs the LongBench data: pass --data FOLDER (the extracted data.zip "
                            "of THUDM/LongBench, or a folder of <task>.jsonl files)")
    load(task, options.data, limit=1)


SUITES = [Suite("longbench", "longbench", TASKS_EN, _samples, _check),
          Suite("longbench-zh", "longbench", TASKS_ZH, _samples, _check)]
