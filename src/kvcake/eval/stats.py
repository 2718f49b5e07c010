"""Uncertainty of evaluation scores: percentile-bootstrap confidence intervals and paired comparisons.

A score is a mean over samples, so it moves with the samples drawn. The percentile bootstrap (Efron & Tibshirani,
*An Introduction to the Bootstrap*, 1993, ch. 13) estimates how much: resample the samples with replacement,
recompute the mean, and take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the recomputed means.

* :func:`mean_interval` — one task's mean score.
* :func:`macro_interval` — the average over tasks of the per-task means (the ``average`` of the reports): every
  replicate resamples each task's samples within that task (a stratified bootstrap, tasks independent of each
  other, each keeping its own size) and averages the task means of that replicate.
* :func:`compare` — one setting against a reference on the same samples: wins, ties and losses, and the interval
  of the mean difference by the paired bootstrap (pairs are resampled whole, so what the two settings share —
  the sample's difficulty — cancels), stratified by task like :func:`macro_interval`.

Everything is pure Python and deterministic: the resampling indices come from :class:`random.Random` seeded with
a string made of ``seed``, the stream name (the task) and the sample count, so an interval depends only on the
scores (in the order given) and the seed, never on the process or on other groups. Quantiles interpolate linearly
between order statistics (Hyndman & Fan 1996, definition 7).
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-quantile of the sorted values ``ordered``, interpolating linearly between order statistics."""
    if not ordered:
        raise ValueError("the quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile is in [0, 1], not {q}")
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


@lru_cache(maxsize=64)
def _draws(n: int, stream: str, resamples: int, seed: int) -> array:
    """``resamples`` draws of ``n`` indices in ``range(n)`` with replacement, one after the other in one array; the
    same for the same arguments (cached: the settings of one task share them)."""
    rng = random.Random(f"kvcake-bootstrap/{seed}/{stream}/{n}/{resamples}")
    return array("I", rng.choices(range(n), k=n * resamples))


def _replicate_means(values: Sequence[float], stream: str, resamples: int, seed: int) -> list[float]:
    values = list(values)
    n = len(values)
    draws = _draws(n, stream, resamples, seed)
    return [math.fsum(map(values.__getitem__, draws[r * n:(r + 1) * n])) / n for r in range(resamples)]


def _check(groups: Sequence[tuple[str, Sequence[float]]], resamples: int, level: float) -> None:
    if not groups or any(len(values) == 0 for _, values in groups):
        raise ValueError("a bootstrap needs at least one value in every group")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, not {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"the level of an interval is in (0, 1), not {level}")


def macro_interval(groups: Sequence[tuple[str, Sequence[float]]], *, resamples: int = RESAMPLES,
                   level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the average over groups of the group means.

    ``groups`` are ``(stream, values)``: a name (the task; it seeds that group's draws) and its per-sample scores.
    Each replicate resamples every group within itself, with replacement and at its own size, and averages the
    replicate means of the groups.
    """
    _check(groups, resamples, level)
    per_group = [_replicate_means(values, stream, resamples, seed) for stream, values in groups]
    replicates = sorted(math.fsum(means) / len(means) for means in zip(*per_group, strict=True))
    return quantile(replicates, (1 - level) / 2), quantile(replicates, (1 + level) / 2)


def mean_interval(values: Sequence[float], *, stream: str = "", resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values``."""
    return macro_interval([(stream, values)], resamples=resamples, level=level, seed=seed)


@dataclass(frozen=True)
class Comparison:
    """A setting against a reference on the same samples: counts of pairs, and the mean score difference."""

    pairs: int
    wins: int  # samples where the setting scored higher than the reference
    ties: int
    losses: int
    difference: float  # average over groups of the mean difference (setting - reference)
    low: float
    high: float


def compare(groups: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, resamples: int = RESAMPLES,
            level: float = LEVEL, seed: int = SEED) -> Comparison:
    """Paired comparison of scores ``a`` with reference scores ``b``, given per group as ``(stream, a, b)`` with
    ``a[i]`` and ``b[i]`` on the same sample.

    The difference is the average over groups of the mean of ``a[i] - b[i]``; its interval is the
    percentile bootstrap of that average, resampling pairs within each group (:func:`macro_interval` of the
    differences, on streams of their own).
    """
    differences = []
    wins = ties = losses = 0
    for stream, a, b in groups:
        if len(a) != len(b):
            raise ValueError(f"group {stream!r}: {len(a)} scores against {len(b)} reference scores")
        d = [x - y for x, y in zip(a, b, strict=True)]
        wins += sum(x > y for x, y in zip(a, b, strict=True))
        ties += sum(x == y for x, y in zip(a, b, strict=True))
        losses += sum(x < y for x, y in zip(a, b, strict=True))
        differences.append((f"paired/{stream}", d))
    low, high = macro_interval(differences, resamples=resamples, level=level, seed=seed)
    mean = math.fsum(math.fsum(d) / len(d) for _, d in differences) / len(differences)
    return Comparison(sum(len(d) for _, d in differences), wins, ties, losses, mean, low, high)
