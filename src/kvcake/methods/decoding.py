"""Decode-time eviction (CAKE §3.4), as a rule on fixed-shape tensors.

At each decoding step a layer that holds more entries than its target drops the lowest-scored entries outside the
protected window; ties go to the earlier position. Written for tensors of a fixed shape, with no host
synchronisation and no data-dependent shapes, so that a decoding step can be compiled and captured in a CUDA graph:
the number of entries to drop is a device tensor, and at most ``max_drops`` (a host constant, usually 1) are ever
candidates.
"""

from __future__ import annotations

from kvcake._lazy import torch


def select_drops(scores: torch.Tensor, occupied: torch.Tensor, drops: torch.Tensor, window: int,
                 max_drops: int) -> torch.Tensor:
    """Which entries to drop, as a bool mask in the same (position) order as ``scores``.

    Parameters
    ----------
    scores : Tensor ``(B, H, C)``
        The scorer's decode-time scores of each entry, in position order: entries that hold no token first (their
        scores are ignored), then the stored tokens by increasing position.
    occupied : bool Tensor ``(B, H, C)``
        True where an entry holds a token.
    drops : int Tensor ``(B, H)`` or ``(B, 1)``
        How many entries to drop in each row and head (0 when the layer is within its target).
    window : int
        The last ``window`` tokens (the newest) are never dropped.
    max_drops : int
        An upper bound of ``drops`` known ahead (from the decode schedule).
    """
    capacity = scores.shape[-1]
    if max_drops <= 1:
        lowest = lowest_candidate(scores, occupied, window)
        chosen = drops.expand(lowest.shape[:-1]).unsqueeze(-1) > 0
        return torch.zeros_like(occupied).scatter(-1, lowest, chosen) & occupied
    index = torch.arange(capacity, device=scores.device)
    protected = (~occupied) | (index >= capacity - window)  # empty slots, and the newest ``window`` entries
    ranked = scores.float().masked_fill(protected, float("inf"))
    order = torch.sort(ranked, dim=-1, stable=True).indices[..., :max_drops]  # lowest first, earlier on ties
    chosen = torch.arange(max_drops, device=scores.device) < drops.expand(order.shape[:-1]).unsqueeze(-1)
    return torch.zeros_like(occupied).scatter(-1, order, chosen) & occupied


def lowest_candidate(scores: torch.Tensor, occupied: torch.Tensor, window: int) -> torch.Tensor:
    """The entry ``(B, H, 1)`` (an index in position order) with the lowest score outside the protected window.

    The first minimum, so ties go to the earlier position. The newest ``window`` entries are cut off by a slice
    rather than masked, which saves a comparison and an ``or`` per layer and step; the answer is the same as the
    argmin over every entry with the protected ones at +inf. When every entry is protected the answer is entry 0
    (callers check that it holds a token).
    """
    capacity = scores.shape[-1]
    cut = capacity - max(window, 0)
    if cut <= 0:
        return torch.zeros((*scores.shape[:-1], 1), dtype=torch.long, device=scores.device)
    ranked = scores[..., :cut].float().masked_fill(~occupied[..., :cut], float("inf"))
    return ranked.argmin(dim=-1, keepdim=True)  # the first minimum: ties go to the earlier position


__all__ = ["lowest_candidate", "select_drops"]
