"""Calibrating CAKE's temperatures tau1, tau2 for a model (``kvcake calibrate``).

CAKE's layer preference is P = H^(1/tau1) * V^(1/tau2) (Qin et al., ICLR 2025, eq. 4); the authors tuned tau per
model at 128 and 1024 tokens per layer and published values between 0.4 and 2.3 (:data:`kvcake.TAU_PRESETS`). This
module searches (tau1, tau2) over a small grid for another model, per budget (and per ratio), on calibration prompts
the harness generates (:mod:`kvcake.eval.suites`) from a seed no evaluation can use: ``calibration-<seed>``, a string,
where ``kvcake eval --seed`` takes integers, so a calibration prompt is never an evaluation prompt.

Each prompt is prefilled once and every (tau1, tau2) is replayed from that record (:mod:`kvcake.integration.replay`,
exact). A setting is scored by

* the task metric: the greedy answer under CAKE at that setting, scored as ``kvcake eval`` scores it (the mean over
  the calibration samples);
* a proxy, cheaper and finer than a metric over a few samples: the KL divergence of the compressed model's
  next-token distributions from the full cache's, teacher-forced on the first ``k`` tokens of the full cache's
  greedy answer (fed in one chunk after the prefill; the first token's distribution is the prefill's, the same for
  every method, and is left out).

The proxy is only used once it is shown to rank the settings as the metric does: for every budget the Spearman rank
correlation between the metric and the negated KL over the settings searched is written to ``tau.json``, and the
choice is made by the KL only when every correlation reaches ``threshold`` (0.8); otherwise by the metric (ties
broken by the KL), and the file says so (``score``, ``why``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The grid of temperatures searched by default: the span of the authors' published values.
DEFAULT_GRID = (0.4, 0.7, 1.0, 1.5, 2.3)
#: Calibration tasks by default: retrieval of one and of several facts, and a multi-hop chain.
DEFAULT_TASKS = ("ruler/niah_multikey", "needlebench/multi_retrieval", "ruler/vt")
SEARCHES = ("grid", "coordinate")
SCORES = ("auto", "metric")
#: The least Spearman correlation (every budget) for the KL proxy to choose.
THRESHOLD = 0.8


class CalibrationError(ValueError):
    """A bad calibration argument (grid, budgets, output path, model)."""


def calibration_seed(seed: int) -> str:
    """The seed calibration prompts are generated from: a string, so it differs from every integer seed of
    ``kvcake eval`` (the generators hash ``"<seed>/<suite>/<task>/..."``)."""
    return f"calibration-{seed}"


# -- arguments --------------------------------------------------------------------------------------------------------
def check_grid(grid: Iterable[float]) -> list[float]:
    values = [float(v) for v in grid]
    if not values:
        raise CalibrationError("--grid needs at least one temperature, e.g. 0.4,0.7,1,1.5,2.3")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise CalibrationError(f"--grid temperatures must be positive and finite, not {bad[0]:g}")
    if len(set(values)) != len(values):
        raise CalibrationError("--grid names a temperature twice")
    return sorted(values)


def check_arguments(budgets: Sequence[int], ratios: Sequence[float], samples: int, grid: Iterable[float],
                    search: str, score: str, k: int, out: Path | None) -> list[float]:
    """Every argument, before a model is loaded; returns the sorted grid."""
    values = check_grid(grid)
    if not budgets and not ratios:
        raise CalibrationError("give --budgets and/or --ratios to calibrate for")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise CalibrationError(f"--budgets are positive numbers of tokens per layer, not {b!r}")
    for r in ratios:
        if not 0 < r <= 1:
            raise CalibrationError(f"--ratios are fractions in (0, 1], not {r!r}")
    if len(set(budgets)) != len(budgets) or len(set(ratios)) != len(ratios):
        raise CalibrationError("a budget or ratio is given twice")
    if samples < 1:
        raise CalibrationError(f"--samples takes a positive number, not {samples}")
    if search not in SEARCHES:
        raise CalibrationError(f"unknown --search {search!r}; choose {' or '.join(SEARCHES)}")
    if score not in SCORES:
        raise CalibrationError(f"unknown --score {score!r}; choose {' or '.join(SCORES)}")
    if k < 2:
        raise CalibrationError(f"--kl-tokens must be at least 2 (the first token's distribution is the prefill's), "
                               f"not {k}")
    if out is not None:
        check_writable(out)
    return values


def check_writable(out: Path) -> None:
    """``out`` can be written now (a calibration run is long: never lose it to a bad path at the end)."""
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CalibrationError(f"--out {str(out)!r} is a folder; give a file name such as tau.json")
    if not out.name.lower().endswith(".json"):
        raise CalibrationError(f"--out {str(out)!r}: name the file .json (kvcake generate --preset reads .json files)")
    if not folder.is_dir():
        raise CalibrationError(f"--out {str(out)!r}: no such folder {str(folder)!r}")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CalibrationError(f"--out {str(out)!r} is not writable")


# -- statistics -------------------------------------------------------------------------------------------------------
def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the tie-averaged ranks); None when either side is constant or
    there are fewer than 3 points, where it says nothing."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of one length")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


# -- the search -------------------------------------------------------------------------------------------------------
@dataclass
class _Prompt:
    """One calibration sample, prefilled once: what every setting is replayed from."""

    sample: Any
    ids: Any  # (1, n) the prompt
    record: Any
    limit: int  # answer length
    forced: Any  # (1, k - 1) the full cache's answer fed back (None: the answer was shorter than 2 tokens)
    full_logits: Any  # (k - 1, vocab) the full cache's next-token logits after each forced token
    full_metric: float = 0.0  # the full cache's answer, scored


@dataclass
class Point:
    """One (tau1, tau2) at one budget or ratio, and its scores (None where not computed)."""

    budget: int | None
    ratio: float | None
    tau1: float
    tau2: float
    metric: float | None = None
    kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "ratio": self.ratio, "tau1": self.tau1, "tau2": self.tau2,
                "metric": None if self.metric is None else round(self.metric, 4),
                "kl": None if self.kl is None else round(self.kl, 6)}


@dataclass
class _Search:
    model: Any
    tokenizer: Any
    prompts: list[_Prompt]
    eos: list[int]
    want_metric: bool
    want_kl: bool
    points: dict[tuple, Point] = field(default_factory=dict)
    bar: Any = None

    def score(self, budget: int | None, ratio: float | None, tau1: float, tau2: float) -> Point:
        """The point's mean metric and KL over the prompts (computed once, then remembered)."""
        key = (budget, ratio, tau1, tau2)
        if key in self.points:
            return self.points[key]
        from kvcake.eval import metrics
        from kvcake.eval.answering import greedy
        from kvcake.integration.replay import replay

        point = Point(budget, ratio, tau1, tau2)
        scores, divergences = [], []
        for p in self.prompts:
            if self.want_metric:
                method = _cake(budget, ratio, tau1, tau2)
                cache = replay(self.model, p.record, method)
                tokens = greedy(self.model, cache, p.record.logits, p.ids.shape[1], method, p.limit, self.eos)
                scores.append(metrics.score(p.sample, self.tokenizer.decode(tokens, skip_special_tokens=True)))
            if self.want_kl and p.forced is not None:
                method = _cake(budget, ratio, tau1, tau2)
                logits = _forced_logits(self.model, replay(self.model, p.record, method), p, method)
                divergences.append(_kl(p.full_logits, logits))
        point.metric = sum(scores) / len(scores) if scores else None
        point.kl = sum(divergences) / len(divergences) if divergences else None
        self.points[key] = point
        if self.bar is not None:
            self.bar.update(1)
        return point


def _cake(budget: int | None, ratio: float | None, tau1: float, tau2: float):
    """CAKE at one budget or ratio and one (tau1, tau2), its other parameters the paper's."""
    from kvcake.methods.registry import build

    return build("cake", budget=budget, ratio=ratio, tau1=tau1, tau2=tau2)


def _forced_logits(model, cache, prompt: _Prompt, method):
    """Next-token logits ``(k - 1, vocab)`` after each of the forced answer tokens, fed in one chunk."""
    import torch

    from kvcake.eval.answering import _attached
    from kvcake.integration.compat import cache_keyword

    n = prompt.ids.shape[1]
    ids = prompt.forced
    positions = torch.arange(n, n + ids.shape[1], device=ids.device)[None]
    with torch.no_grad(), _attached(model, method):
        out = model(input_ids=ids, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True)
    return out.logits[0].float()


def _kl(full, compressed) -> float:
    """Mean over positions of KL(full || compressed) of the next-token distributions, in nats."""
    import torch

    logp, logq = torch.log_softmax(full, dim=-1), torch.log_softmax(compressed, dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _better(point: Point, other: Point | None, by: str) -> bool:
    """Whether ``point`` beats ``other`` under the criterion ``by`` (``kl``: lower KL first, then higher metric;
    ``metric``: higher metric first, then lower KL), then by nearness to (1, 1) on a log scale, then smaller tau."""
    if other is None:
        return True

    def key(p: Point) -> tuple:
        metric = -(p.metric if p.metric is not None else -math.inf)
        kl = p.kl if p.kl is not None else math.inf
        first = (kl, metric) if by == "kl" else (metric, kl)
        return (*first, abs(math.log(p.tau1)) + abs(math.log(p.tau2)), p.tau1, p.tau2)

    return key(point) < key(other)


def _grid_search(search: _Search, budget, ratio, grid: list[float], by: str) -> list[Point]:
    return [search.score(budget, ratio, t1, t2) for t1 in grid for t2 in grid]


def _coordinate_search(search: _Search, budget, ratio, grid: list[float], by: str, rounds: int = 4) -> list[Point]:
    """From the grid value nearest 1 for both, alternately the best tau1 for the current tau2 and the best tau2 for
    the current tau1, until neither moves (or ``rounds`` rounds)."""
    t1 = t2 = min(grid, key=lambda v: abs(math.log(v)))
    for _ in range(rounds):
        moved = False
        for axis in (1, 2):
            best = None
            for v in grid:
                p = search.score(budget, ratio, v if axis == 1 else t1, t2 if axis == 1 else v)
                best = p if _better(p, best, by) else best
            assert best is not None
            new = (best.tau1, best.tau2)
            moved = moved or new != (t1, t2)
            t1, t2 = new
        if not moved:
            break
    return [p for p in search.points.values() if (p.budget, p.ratio) == (budget, ratio)]


def _key(budget: int | None, ratio: float | None) -> str:
    return str(budget) if budget is not None else f"{ratio:g}"


def _samples(tokenizer, tasks: Sequence[str], samples: int, lengths: Sequence[int], depths: Sequence[float],
             seed: int, corpus: Path | None) -> list[Any]:
    """``samples`` calibration samples, taken in turn from each task (generated from :func:`calibration_seed`)."""
    from kvcake.eval.tasks import SuiteOptions, load_samples

    each = -(-samples // len(tasks))
    options = SuiteOptions(lengths=list(lengths), depths=list(depths), per_cell=each,
                           seed=calibration_seed(seed), corpus=corpus, limit=each)  # type: ignore[arg-type]
    by_task: dict[str, list[Any]] = {}
    for s in load_samples(list(tasks), tokenizer, options):
        by_task.setdefault(s.task, []).append(s)
    chosen: list[Any] = []
    for i in range(each):
        chosen += [group[i] for group in by_task.values() if i < len(group)]
    return chosen[:samples]


def _prepare(model, tokenizer, sample, first_method, k: int, max_new_tokens: int | None, eos: list[int]) -> _Prompt:
    """Prefill one sample (recording it for every setting) and the full cache's teacher-forced reference."""
    import torch

    from kvcake.eval import metrics
    from kvcake.eval.answering import greedy
    from kvcake.eval.prompts import encode
    from kvcake.integration.replay import queries_needed, record_prefill, replay

    device = next(model.parameters()).device
    limit = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
    limit_length = getattr(model.config, "max_position_embeddings", None)
    enc = encode(tokenizer, sample, None if limit_length is None else limit_length - max(limit, k))
    ids = torch.cat([enc.context_ids, enc.question_ids], dim=1).to(device)
    record, _ = record_prefill(model, ids, first_method, queries=queries_needed([first_method]))
    # Greedy is a prefix of itself: the first k tokens are the teacher-forced ones, the first `limit` the answer.
    answer = greedy(model, replay(model, record, None), record.logits, ids.shape[1], None, max(limit, k), eos)
    score = metrics.score(sample, tokenizer.decode(answer[:limit], skip_special_tokens=True))
    forced = full = None
    if len(answer[:k]) >= 2:
        forced = torch.tensor([answer[: k - 1]], device=device)
        prompt = _Prompt(sample, ids, record, limit, forced, None)
        full = _forced_logits(model, replay(model, record, None), prompt, None)
    return _Prompt(sample, ids, record, limit, forced, full, score)


def calibrate(model: str | None, budgets: Sequence[int] = (), ratios: Sequence[float] = (), samples: int = 8,
              out: Path | None = Path("tau.json"), tasks: Sequence[str] = DEFAULT_TASKS,
              grid: Iterable[float] = DEFAULT_GRID, lengths: Sequence[int] = (1000,),
              depths: Sequence[float] = (0.25, 0.5, 0.75), seed: int = 0, search: str = "grid", score: str = "auto",
              k: int = 16, max_new_tokens: int | None = None, threshold: float = THRESHOLD,
              corpus: Path | None = None, dtype: str = "float32", attn: str = "sdpa", progress: bool = True,
              loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Search CAKE's (tau1, tau2) per budget and ratio for ``model`` and write ``out`` (the result, returned too).

    Parameters
    ----------
    model : str or None
        An embedded model name or a local model folder (None: the default embedded model).
    budgets, ratios : sequences
        Cache budgets (tokens per layer) and fractions of the prompt to calibrate for.
    samples : int
        Calibration prompts, taken in turn from ``tasks`` (generated from :func:`calibration_seed`).
    grid : iterable of float
        Temperatures tried for each of tau1 and tau2.
    search : ``grid`` or ``coordinate``
        Every (tau1, tau2) of the grid, or a coordinate search over it from (1, 1).
    score : ``auto`` or ``metric``
        ``auto`` computes the metric and the KL proxy and chooses by the KL only where they agree (Spearman at
        least ``threshold`` for every budget and ratio); ``metric`` chooses by the metric alone.
    k : int
        Answer tokens of the full cache the KL is teacher-forced on.
    max_new_tokens : int, optional
        Cap on the answers scored by the metric (default: each task's own length).
    loaded : (model, tokenizer), optional
        An already loaded model (``model`` then only names it in the file).

    Returns
    -------
    dict
        The content of ``tau.json``: ``model``, ``budgets`` and ``ratios`` (key -> [tau1, tau2]), ``seed``,
        ``samples``, ``score`` (``metric`` or ``kl``), ``full_metric`` (the full cache's), ``spearman`` (the
        least correlation over the budgets and ratios, None where undefined), ``spearman_by_budget``, ``grid``,
        ``results`` (every point searched, with its mean metric and KL) and what the run was (tasks, lengths,
        search, k, seconds).
    """
    values = check_arguments(budgets, ratios, samples, grid, search, score, k, out)
    from kvcake import models as registry_models

    begin = time.perf_counter()
    try:
        name = registry_models.DEFAULT_MODEL if model is None and loaded is None else model
        if loaded is None:
            registry_models.resolve(name)  # an unknown model fails here, before any loading
    except registry_models.ModelNotAvailableError as exc:
        raise CalibrationError(str(exc)) from None
    from kvcake.eval.tasks import SuiteOptions, check

    tasks = check(list(tasks), SuiteOptions(lengths=list(lengths), depths=list(depths), corpus=corpus))
    import torch

    if loaded is None:
        net, tokenizer = registry_models.load(name, dtype=getattr(torch, dtype), attn_implementation=attn)
    else:
        net, tokenizer = loaded
    eos = registry_models.eos_token_ids(net, tokenizer)
    chosen = _samples(tokenizer, tasks, samples, lengths, depths, seed, corpus)
    keys = [(b, None) for b in budgets] + [(None, r) for r in ratios]
    first = _cake(keys[0][0], keys[0][1], 1.0, 1.0)
    prompts = [_prepare(net, tokenizer, s, first, k, max_new_tokens, eos) for s in chosen]
    want_kl = score == "auto"
    runner = _Search(net, tokenizer, prompts, eos, want_metric=True, want_kl=want_kl)
    from tqdm.auto import tqdm

    total = len(keys) * len(values) ** 2 if search == "grid" else None
    runner.bar = tqdm(total=total, desc="calibrating tau", unit="setting", disable=not progress, dynamic_ncols=True)
    searched: dict[str, list[Point]] = {}
    by = "kl" if want_kl else "metric"
    for budget, ratio in keys:
        runner.bar.set_postfix_str(f"budget {budget}" if ratio is None else f"ratio {ratio:g}", refresh=False)
        walk = _grid_search if search == "grid" else _coordinate_search
        searched[_key(budget, ratio)] = walk(runner, budget, ratio, values, by)
    runner.bar.close()
    criterion, best, correlations = choose(searched, want_kl, threshold)
    defined = [c for c in correlations.values() if c is not None]
    result = {
        "model": name if loaded is None or model is not None else getattr(net.config, "_name_or_path", None),
        "budgets": {_key(b, None): best[_key(b, None)] for b in budgets},
        "ratios": {_key(None, r): best[_key(None, r)] for r in ratios},
        "seed": calibration_seed(seed), "samples": len(prompts), "score": criterion,
        "full_metric": round(sum(p.full_metric for p in prompts) / len(prompts), 4),
        "spearman": (min(defined) if len(defined) == len(correlations) else None) if want_kl else None,
        "spearman_by_budget": {key: None if c is None else round(c, 4) for key, c in correlations.items()},
        "threshold": threshold if want_kl else None,
        "why": _why(want_kl, criterion == "kl", correlations, threshold),
        "grid": values, "search": search, "tasks": list(tasks), "lengths": list(lengths), "depths": list(depths),
        "kl_tokens": k, "max_new_tokens": max_new_tokens,
        "results": [p.to_dict() for points in searched.values() for p in points],
        "seconds": round(time.perf_counter() - begin, 1),
    }
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def choose(searched: dict[str, list[Point]], use_kl: bool,
           threshold: float = THRESHOLD) -> tuple[str, dict[str, list[float]], dict[str, float | None]]:
    """The criterion, the best (tau1, tau2) per budget or ratio key, and the Spearman correlation per key between
    the metric and the negated KL over the points searched (None where undefined or not computed).

    The KL chooses only when ``use_kl`` and every key's correlation is defined and at least ``threshold``; else the
    metric does, the KL breaking its ties (:func:`_better`)."""
    correlations: dict[str, float | None] = {}
    for key, points in searched.items():
        pairs = [(p.metric, -p.kl) for p in points if p.metric is not None and p.kl is not None]
        correlations[key] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if use_kl else None
    agree = use_kl and all(c is not None and c >= threshold for c in correlations.values())
    criterion = "kl" if agree else "metric"
    best: dict[str, list[float]] = {}
    for key, points in searched.items():
        top: Point | None = None
        for p in points:
            top = p if _better(p, top, criterion) else top
        assert top is not None
        best[key] = [top.tau1, top.tau2]
    return criterion, best, correlations


def _why(want_kl: bool, agree: bool, correlations: dict[str, float | None], threshold: float) -> str:
    if not want_kl:
        return "chosen by the task metric (--score metric)"
    if agree:
        return f"chosen by the KL proxy: it ranks the settings as the metric does (Spearman >= {threshold} everywhere)"
    weak = ", ".join(f"{k}: {'undefined' if c is None else f'{c:.2f}'}" for k, c in correlations.items()
                     if c is None or c < threshold)
    return (f"chosen by the task metric (ties broken by the KL): the proxy's rank correlation with the metric is weak "
            f"or undefined (a constant metric) at {weak}")


__all__ = ["DEFAULT_GRID", "DEFAULT_TASKS", "THRESHOLD", "CalibrationError", "Point", "calibrate", "calibration_seed",
           "check_arguments", "check_grid", "choose", "spearman"]
