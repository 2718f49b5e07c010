"""The official LongBench (v1) metrics, reproduced from THUDM/LongBench ``metrics.py`` and ``eval.py``.

Each per-reference function returns a value in [0, 1] exactly as LongBench computes it; the metrics of
:data:`METRICS` apply LongBench's first-line cut (``sample.meta["first_line_only"]``), take the maximum over the
references and scale to [0, 100].
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kvcake.eval.sample import EvalDataError, Metric, Sample

PerReference = Callable[..., float]

_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

_rouge: Any = None


def _jieba() -> Any:
    try:
        import jieba
    except ImportError as exc:
        raise ImportError(
            "the Chinese LongBench metrics (qa_f1_zh, rouge_zh) need jieba: pip install jieba"
        ) from exc
    return jieba


def _rouge_scorer() -> Any:
    global _rouge
    if _rouge is None:
        try:
            from rouge import Rouge
        except ImportError as exc:
            raise ImportError("the LongBench rouge metrics need the rouge package: pip install 'rouge>=1.0.1'") from exc
        _rouge = Rouge()
    return _rouge


def first_line(prediction: str) -> str:
    """LongBench's cut for the few-shot tasks: the first line after any leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    jieba = _jieba()

    def tokens(text: str) -> list[str]:
        normalized = (normalize_zh_answer(token) for token in jieba.cut(text, cut_all=False))
        return [token for token in normalized if token]

    return token_f1(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F of the ``rouge`` package; 0.0 whenever it fails (empty text, too deep a recursion), as LongBench."""
    scorer = _rouge_scorer()
    try:
        scores = scorer.get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - LongBench scores any rouge failure as 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    jieba = _jieba()
    return rouge_score(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False)))


def classification_score(
    prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None, **_: Any
) -> float:
    """LongBench's classification score, including its quirk of removing items from the list while walking it."""
    if all_classes is None:
        raise EvalDataError("the classification metric needs the task's classes (sample.meta['all_classes'])")
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _fraction_equal(prediction, str(ground_truth))


def _reference_id(pattern: str, ground_truth: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise EvalDataError(f"retrieval reference {ground_truth!r} does not match {pattern!r}")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _fraction_equal(prediction, _reference_id(r"Paragraph (\d+)", ground_truth))


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _fraction_equal(prediction, _reference_id(r"段落(\d+)", ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` with its pure-Python backend (difflib): equal strings 100, an empty one 0."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Similarity of the first predicted line that holds no backtick, ``#`` or ``//`` to the reference line."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz_ratio(line, ground_truth) / 100


def longbench_score(fn: PerReference, prediction: str, references: Sequence[str], sample: Sample) -> float:
    """LongBench's per-sample score in [0, 100]: optional first-line cut, max over the references, × 100."""
    if sample.meta.get("first_line_only"):
        prediction = first_line(prediction)
    all_classes = sample.meta.get("all_classes")
    best = 0.0
    for reference in references:
        best = max(best, fn(prediction, reference, all_classes=all_classes))
    return 100.0 * best


PER_REFERENCE: dict[str, PerReference] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def _metric(name: str, fn: PerReference) -> Metric:
    """``fn`` (one reference) as a metric over every reference of a sample, named ``name``."""

    def metric(prediction: str, references: list[str], sample: Sample) -> float:
        return longbench_score(fn, prediction, references, sample)

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = f"LongBench {name}: {fn.__name__} per reference, max over the references, in [0, 100]."
    return metric


#: The metrics of the suite, by the name a sample gives in ``Sample.metric``.
METRICS: dict[str, Metric] = {name: _metric(name, fn) for name, fn in PER_REFERENCE.items()}
