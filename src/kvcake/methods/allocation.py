"""Splitting one global token budget across layers in proportion to their preference.

CAKE (section 3.2) asks for B_l = P_l / sum_k P_k * B_total. Integer budgets must sum to B_total exactly, must not
exceed what a layer holds (the cap), and in the cascade must never grow when a new layer joins the split. The
authors' code truncates and redistributes evenly without re-capping, which breaks all three.

We use a capped divisor method (Sainte-Lague/Webster): every layer l bids P_l / (k + 1/2) for its (k+1)-th token,
k < cap_l, and the ``total`` highest bids win; equal bids go to the layer holding fewer tokens (1 / (k + 1/2)),
then to the lower layer index. The second rule splits evenly what falls to layers of zero preference (all of it
when every preference is zero, else what is left once every layer of positive preference is capped). Because every
bid's value and rank depend only on its own layer, adding a layer can only push existing bids out of the winning
set: budgets never grow across cascade stages, and the final stage is exactly the one-shot split (the "new-state
paradox" that largest-remainder rounding suffers cannot occur). Capped layers fall out of the bidding, which is the
water-filling redistribution of excess in proportion to preference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvcake._lazy import torch


def _key(prefs: Sequence[float], layer: int, k: int) -> tuple[float, float, int]:
    """Rank of layer ``layer``'s bid for its (k+1)-th token: higher value first, then fewer tokens held, then lower
    layer index."""
    return (prefs[layer] / (k + 0.5), 1.0 / (k + 0.5), -layer)


def allocate(preferences: Sequence[float], total: int, caps: Sequence[int] | int) -> list[int]:
    """Integer budgets proportional to ``preferences`` that sum to ``min(total, sum(caps))``.

    Parameters
    ----------
    preferences : sequence of float
        Non-negative, finite preference per layer. If all are zero, layers are treated as equal.
    total : int
        Tokens to hand out (the evictable budget, window excluded).
    caps : int or sequence of int
        The most each layer can take (the tokens it holds outside the window).

    Returns
    -------
    list of int, one budget per layer.
    """
    n = len(preferences)
    if isinstance(caps, int):
        caps = [caps] * n
    caps = [max(0, int(c)) for c in caps]
    if len(caps) != n:
        raise ValueError(f"got {n} preferences but {len(caps)} caps")
    prefs = [float(p) for p in preferences]
    if any(not math.isfinite(p) or p < 0 for p in prefs):
        raise ValueError(f"layer preferences must be finite and non-negative, got {prefs}")
    if total < 0:
        raise ValueError(f"total budget must be non-negative, got {total}")
    if n == 0:
        return []
    if sum(caps) <= total:
        return list(caps)

    # Start from the floor of the continuous capped water-filling solution (close to the answer), then exchange
    # single tokens until the allocation is exactly the set of the `total` highest bids.
    budgets = [min(c, int(x)) for c, x in zip(caps, _water_fill(prefs, total, caps))]
    while sum(budgets) < total:
        best = max((l for l in range(n) if budgets[l] < caps[l]), key=lambda l: _key(prefs, l, budgets[l]))
        budgets[best] += 1
    while sum(budgets) > total:
        worst = min((l for l in range(n) if budgets[l] > 0), key=lambda l: _key(prefs, l, budgets[l] - 1))
        budgets[worst] -= 1
    while True:
        open_layers = [l for l in range(n) if budgets[l] < caps[l]]
        held_layers = [l for l in range(n) if budgets[l] > 0]
        if not open_layers or not held_layers:
            break
        best = max(open_layers, key=lambda l: _key(prefs, l, budgets[l]))
        worst = min(held_layers, key=lambda l: _key(prefs, l, budgets[l] - 1))
        if _key(prefs, best, budgets[best]) <= _key(prefs, worst, budgets[worst] - 1):
            break
        budgets[best] += 1
        budgets[worst] -= 1
    return budgets


def _water_fill(prefs: Sequence[float], total: int, caps: Sequence[int]) -> list[float]:
    """Continuous solution x_l = min(cap_l, lam * P_l) with sum x = total (assumes total < sum(caps))."""
    n = len(prefs)
    capped = [False] * n
    while True:
        free = total - sum(caps[l] for l in range(n) if capped[l])
        weight = sum(prefs[l] for l in range(n) if not capped[l])
        if weight <= 0:  # only zero-preference layers are left: they share the rest evenly (see _key)
            rest = [l for l in range(n) if not capped[l]]
            out = [float(caps[l]) if capped[l] else 0.0 for l in range(n)]
            if rest and free > 0:
                for l, x in zip(rest, _water_fill([1.0] * len(rest), free, [caps[l] for l in rest])):
                    out[l] = x
            return out
        lam = free / weight
        newly = [l for l in range(n) if not capped[l] and lam * prefs[l] >= caps[l]]
        if not newly:
            return [float(caps[l]) if capped[l] else lam * prefs[l] for l in range(n)]
        for l in newly:
            capped[l] = True


def uniform(num_layers: int, total: int, caps: Sequence[int] | int) -> list[int]:
    """Equal split (the paper's "uniform" ablation), exact and capped: allocation with equal preferences."""
    return allocate([1.0] * num_layers, total, caps)


def head_counts(scores, budget: int, alpha: float):
    """Ada-KV's split of a layer's budget over its KV heads (Feng et al., 2024, arXiv 2407.11550).

    ``scores`` ``(Hkv, N)`` ranks each head's evictable entries (-inf for entries that must not be kept). Every head
    first gets its ``floor(alpha * budget)`` best entries; the remaining ``budget * Hkv`` minus those go to the best
    remaining scores of any head (ties: lower head, then earlier rank). Returns the count per head, a tensor ``(Hkv,)``.
    Counts are nested in ``budget``: a smaller budget never keeps an entry a larger one drops.
    """
    heads, n = scores.shape
    floor = min(int(alpha * budget), n)
    ordered = torch.sort(scores, dim=-1, descending=True, stable=True).values
    keepable = ordered > float("-inf")  # -inf (and NaN) entries are never kept
    counts = keepable[:, :floor].sum(-1)
    rest = budget * heads - int(counts.sum())
    residual = ordered[:, floor:].reshape(-1)
    usable = min(rest, int(keepable[:, floor:].sum()))
    if usable > 0:
        picked = torch.sort(residual, descending=True, stable=True).indices[:usable]
        counts = counts + torch.bincount(picked // max(n - floor, 1), minlength=heads)
    return counts
