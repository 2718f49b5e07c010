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
    budgets = [min(c, int(x)) for c, x in zip(caps, _water_fill(prefs, total, caps), strict=True)]
    while sum(budgets) < total:
        best = max((i for i in range(n) if budgets[i] < caps[i]), key=lambda i: _key(prefs, i, budgets[i]))
        budgets[best] += 1
    while sum(budgets) > total:
        worst = min((i for i in range(n) if budgets[i] > 0), key=lambda i: _key(prefs, i, budgets[i] - 1))
        budgets[worst] -= 1
    while True:
        open_layers = [i for i in range(n) if budgets[i] < caps[i]]
        held_layers = [i for i in range(n) if budgets[i] > 0]
        if not open_layers or not held_layers:
            break
        best = max(open_layers, key=lambda i: _key(prefs, i, budgets[i]))
        worst = min(held_layers, key=lambda i: _key(prefs, i, budgets[i] - 1))
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
        free = total - sum(caps[i] for i in range(n) if capped[i])
        weight = sum(prefs[i] for i in range(n) if not capped[i])
        if weight <= 0:  # only zero-preference layers are left: they share the rest evenly (see _key)
            rest = [i for i in range(n) if not capped[i]]
            out = [float(caps[i]) if capped[i] else 0.0 for i in range(n)]
            if rest and free > 0:
                for i, x in zip(rest, _water_fill([1.0] * len(rest), free, [caps[i] for i in rest]), strict=True):
                    out[i] = x
            return out
        lam = free / weight
        newly = [i for i in range(n) if not capped[i] and lam * prefs[i] >= caps[i]]
        if not newly:
            return [float(caps[i]) if capped[i] else lam * prefs[i] for i in range(n)]
        for i in newly:
            capped[i] = True



# -- the same allocation on tensors, without host synchronisation -----------------------------------------------------

#: Bit pattern of +inf in float64; for non-negative doubles the int64 bit pattern orders like the value.
_INF_BITS = 0x7FF0000000000000
#: Smallest normal float64; below it doubles are multiples of 2**-1074.
_TINY = 2.0**-1022
#: Bits of the threshold's bit pattern settled per search round (2**_ROUND_BITS probes per round).
_ROUND_BITS = 8
#: Bids checked exactly around the estimated end of a layer's run of bids at or above a threshold.
_WINDOW = 4


def _count_at_least(prefs: torch.Tensor, value: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """``#{0 <= k < cap : prefs / (k + 1/2) >= value}`` elementwise (broadcast), the bids computed in float64 as
    :func:`allocate` computes them.

    Rounding is monotone, so a layer's bids never increase with ``k`` and those at or above ``value`` are a prefix.
    Its end is estimated from ``prefs / t - 1/2``, where ``t`` is the least real that rounds to ``value`` or above:
    ``t`` is ``value`` to within one part in 2**52 for a normal ``value``, and ``(m - 1/2) * 2**-1074`` for a
    subnormal ``value = m * 2**-1074`` (where the spacing of doubles is absolute, so the rounding of a bid moves it
    by up to half a spacing). Once clamped to ``cap + 4`` (caps below 2**40), the estimate is within 1/16 of the true
    end, so the end lies among the ``_WINDOW`` bids checked exactly around it; every bid before them is at or
    above ``value`` and every bid after them below it.
    """
    capf = caps.to(torch.float64)
    bits = value.view(torch.int64).to(torch.float64)  # m for subnormal values (exact: m < 2**52)
    normal = prefs / value
    subnormal = (prefs * 2.0**100) / ((bits - 0.5) * 2.0**-974)  # prefs / ((m - 1/2) 2**-1074), both factors exact
    estimate = torch.where(value < _TINY, subnormal, normal)
    estimate = torch.where(value == 0, torch.full_like(estimate, math.inf), estimate)
    estimate = torch.minimum(estimate, capf + 4.0)
    first = torch.floor(estimate - 0.5).to(torch.int64) - 1
    ks = first.unsqueeze(-1) + torch.arange(_WINDOW, device=first.device)
    bids = prefs.unsqueeze(-1) / (ks.to(torch.float64) + 0.5)
    hits = (ks >= 0) & (ks < caps.unsqueeze(-1)) & (bids >= value.unsqueeze(-1))
    return torch.minimum(first.clamp(min=0), caps) + hits.sum(-1)


def _as_rows(x: torch.Tensor | int, rows: int, layers: int, name: str, device: torch.device) -> torch.Tensor:
    """``total`` as ``(B,)`` or ``caps`` as ``(B, L)``, int64 on ``device``."""
    t = torch.as_tensor(x, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if name == "total":
        if t.dim() == 0:
            return t.expand(rows)
        if t.shape != (rows,):
            raise ValueError(f"total must be an int or of shape ({rows},), got {tuple(t.shape)}")
        return t
    if t.dim() == 0:
        return t.expand(rows, layers)
    if t.dim() == 1 and t.shape[0] == rows:
        return t.unsqueeze(-1).expand(rows, layers)
    if t.shape != (rows, layers):
        raise ValueError(f"caps must be an int or of shape ({rows},) or ({rows}, {layers}), got {tuple(t.shape)}")
    return t


def allocate_tensor(preferences: torch.Tensor, total: torch.Tensor | int, caps: torch.Tensor | int) -> torch.Tensor:
    """:func:`allocate` for every row of a batch, on the tensors' device, with no host synchronisation.

    Row ``b`` gets exactly ``allocate(preferences[b].tolist(), int(total[b]), caps[b].tolist())``: the ``total``
    highest bids ``P_l / (k + 1/2)``, ``k < cap_l`` (the capped Sainte-Lague/Webster divisor method applied to CAKE's
    budget split, Qin et al., ICLR 2025, section 3.2), equal bids going to the smaller ``k``, then to the lower layer;
    every layer gets its cap when ``sum(caps) <= total``. The work is a fixed sequence of kernels whatever the values
    (no ``.item()``, no value-dependent shapes or branches), so it runs under ``torch.compile(fullgraph=True)`` and in
    CUDA graphs.

    Method. A layer's bids never increase with ``k`` (rounding is monotone), so the number of its bids at or above a
    value ``v`` is found exactly with a window of divisions around the estimate ``P_l / v - 1/2`` (see
    ``_count_at_least``), and the count over layers, ``E(v)``, never increases with ``v``. The winning threshold
    ``v*`` is the largest float64 with ``E(v*) >= total``; for non-negative doubles the int64 bit pattern orders like
    the value, so ``v*`` is found bit by bit, ``_ROUND_BITS`` bits per round with one probe per pattern of those
    bits (63 bits, a fixed number of rounds, exact: no tolerance is involved). Bids above ``v*`` all win; of the bids
    equal to ``v*``, which form the run ``[c_l, e_l)`` of each layer's ``k``, the ``total - sum(c)`` first in the
    order (``k``, layer) win. Their count below a given ``k`` is piecewise linear in ``k`` with breaks at the ``c_l``
    and ``e_l``, so the last full ``k`` is found in closed form from those 2L breaks, and the rest go to the lowest
    layers still in the run there. Every comparison is between float64 bids computed as :func:`allocate` computes
    them (IEEE division, correctly rounded on CPU and CUDA), so the selected set, hence the result, is the same
    bit for bit.

    Parameters
    ----------
    preferences : torch.Tensor
        ``(B, L)``, ``L >= 1``: one row of non-negative, finite layer preferences per batch row (converted to
        float64). For the cascade pass only the ``m`` layers seen so far, ``(B, m)``.
    total : torch.Tensor or int
        ``(B,)`` integer tokens to hand out per row, or one int for all rows.
    caps : torch.Tensor or int
        The most each layer can take: ``(B, L)``, ``(B,)`` (one cap per row) or one int; below 2**40.

    Returns
    -------
    torch.Tensor
        ``(B, L)`` int64 budgets on the device of ``preferences``.

    Notes
    -----
    Shapes and dtypes are checked; values are not, since that would need the host: negative, NaN or infinite
    preferences give unspecified budgets, negative caps count as 0 (as in :func:`allocate`) and a negative total
    as 0.
    """
    if not isinstance(preferences, torch.Tensor) or preferences.dim() != 2:
        raise ValueError("preferences must be a tensor of shape (batch, layers)")
    if not preferences.is_floating_point():
        raise ValueError(f"preferences must be floating point, got dtype {preferences.dtype}")
    rows, layers = preferences.shape
    device = preferences.device
    total_t = _as_rows(total, rows, layers, "total", device).clamp(min=0)
    caps_t = _as_rows(caps, rows, layers, "caps", device).clamp(min=0)
    if layers == 0:
        return caps_t.clone()
    prefs = preferences.to(torch.float64)
    supply = caps_t.sum(-1)
    goal = torch.minimum(total_t, supply)  # keeps E(0) = sum(caps) >= goal, the search's starting invariant

    # Largest bit pattern u with E(u) >= goal, settled from the top bit down (bit 63 is the sign, always 0).
    prefix = torch.zeros(rows, dtype=torch.int64, device=device)
    low = 63
    while low > 0:
        width = min(_ROUND_BITS, low)
        low -= width
        probes = prefix.unsqueeze(-1) + (torch.arange(2**width, device=device) << low)
        values = probes.clamp(max=_INF_BITS).view(torch.float64)
        held = _count_at_least(prefs.unsqueeze(1), values.unsqueeze(-1), caps_t.unsqueeze(1)).sum(-1)
        prefix = prefix + (((held >= goal.unsqueeze(-1)).sum(-1) - 1) << low)
    top = prefix.clamp(max=_INF_BITS)
    upto = _count_at_least(prefs, top.view(torch.float64).unsqueeze(-1), caps_t)  # e_l: bids >= v*
    above = _count_at_least(prefs, (top + 1).clamp(max=_INF_BITS).view(torch.float64).unsqueeze(-1), caps_t)
    above = torch.where((top >= _INF_BITS).unsqueeze(-1), torch.zeros_like(above), above)  # c_l: bids > v*

    # Bids equal to v*: k in [c_l, e_l); take the first `rest` in the order (k, layer).
    rest = goal - above.sum(-1)
    run = upto - above
    breaks = torch.cat([above, upto], dim=-1)  # (B, 2L)
    taken = (breaks.unsqueeze(-1) - above.unsqueeze(1)).clamp(min=0).minimum(run.unsqueeze(1)).sum(-1)
    start = torch.where(taken <= rest.unsqueeze(-1), breaks, torch.full_like(breaks, -1)).amax(-1)
    before = (start.unsqueeze(-1) - above).clamp(min=0).minimum(run).sum(-1)
    slope = ((above <= start.unsqueeze(-1)) & (start.unsqueeze(-1) < upto)).sum(-1)
    full = torch.where(slope > 0, (rest - before) // slope.clamp(min=1), torch.zeros_like(slope))
    last = start + full  # every tied bid with k < last wins
    extra = rest - before - full * slope  # ... and the first `extra` layers whose run holds k = last
    open_ = (above <= last.unsqueeze(-1)) & (last.unsqueeze(-1) < upto)
    order = torch.cumsum(open_.to(torch.int64), dim=-1) - open_.to(torch.int64)
    budgets = above + (last.unsqueeze(-1) - above).clamp(min=0).minimum(run) + (open_ & (order < extra.unsqueeze(-1)))
    return torch.where((total_t >= supply).unsqueeze(-1), caps_t, budgets)


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
