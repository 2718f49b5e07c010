"""The search itself: calibration prompts prefilled once, every (tau1, tau2) replayed and scored, ``tau.json``
written (see the package docstring)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcake.calibrate.choice import Point, _better, _why, choose
from kvcake.calibrate.options import (
    DEFAULT_GRID,
    DEFAULT_TASKS,
    THRESHOLD,
    CalibrationError,
    calibration_seed,
    check_arguments,
)


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
        from kvcake.engines.transformers.replay import replay
        from kvcake.eval import metrics
        from kvcake.eval.answering import greedy

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

    from kvcake.engines.transformers.compat import cache_keyword
    from kvcake.eval.answering import attached

    n = prompt.ids.shape[1]
    ids = prompt.forced
    positions = torch.arange(n, n + ids.shape[1], device=ids.device)[None]
    with torch.no_grad(), attached(model, method):
        out = model(input_ids=ids, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True)
    return out.logits[0].float()


def _kl(full, compressed) -> float:
    """Mean over positions of KL(full || compressed) of the next-token distributions, in nats."""
    import torch

    logp, logq = torch.log_softmax(full, dim=-1), torch.log_softmax(compressed, dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


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

    from kvcake.engines.transformers.replay import queries_needed, record_prefill, replay
    from kvcake.eval import metrics
    from kvcake.eval.answering import greedy
    from kvcake.eval.prompts import encode

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
    begin = time.perf_counter()
    from kvcake.eval.tasks import SuiteOptions, check

    name = _check_model(model, loaded)
    tasks = check(list(tasks), SuiteOptions(lengths=list(lengths), depths=list(depths), corpus=corpus))
    net, tokenizer = loaded if loaded is not None else _load(name, dtype, attn)
    from kvcake import models as registry_models

    eos = registry_models.eos_token_ids(net, tokenizer)
    chosen = _samples(tokenizer, tasks, samples, lengths, depths, seed, corpus)
    keys = [(b, None) for b in budgets] + [(None, r) for r in ratios]
    first = _cake(keys[0][0], keys[0][1], 1.0, 1.0)
    prompts = [_prepare(net, tokenizer, s, first, k, max_new_tokens, eos) for s in chosen]
    want_kl = score == "auto"
    runner = _Search(net, tokenizer, prompts, eos, want_metric=True, want_kl=want_kl)
    searched = _walk(runner, keys, values, search, "kl" if want_kl else "metric", progress)
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


def _check_model(model: str | None, loaded: tuple[Any, Any] | None) -> str | None:
    """The model's name; an unknown one fails here, before anything is loaded."""
    from kvcake import models as registry_models

    name = registry_models.DEFAULT_MODEL if model is None and loaded is None else model
    if loaded is None:
        try:
            registry_models.resolve(name)
        except registry_models.ModelNotAvailableError as exc:
            raise CalibrationError(str(exc)) from None
    return name


def _load(name: str | None, dtype: str, attn: str) -> tuple[Any, Any]:
    import torch

    from kvcake import models as registry_models

    return registry_models.load(name, dtype=getattr(torch, dtype), attn_implementation=attn)


def _walk(runner: _Search, keys: Sequence[tuple[int | None, float | None]], values: list[float], search: str, by: str,
          progress: bool) -> dict[str, list[Point]]:
    """Every budget's and ratio's points searched, with a progress bar."""
    from tqdm.auto import tqdm

    total = len(keys) * len(values) ** 2 if search == "grid" else None
    runner.bar = tqdm(total=total, desc="calibrating tau", unit="setting", disable=not progress, dynamic_ncols=True)
    searched: dict[str, list[Point]] = {}
    walk = _grid_search if search == "grid" else _coordinate_search
    for budget, ratio in keys:
        runner.bar.set_postfix_str(f"budget {budget}" if ratio is None else f"ratio {ratio:g}", refresh=False)
        searched[_key(budget, ratio)] = walk(runner, budget, ratio, values, by)
    runner.bar.close()
    return searched

__all__ = ["calibrate"]
