"""Choosing (tau1, tau2): the points searched, Spearman's rank correlation between the metric and the KL proxy,
and the rule that lets the proxy choose only where it ranks the settings as the metric does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvcake.calibrate.options import THRESHOLD


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


__all__ = ["Point", "choose", "spearman"]
