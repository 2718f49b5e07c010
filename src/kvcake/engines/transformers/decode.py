"""Attention over a compressed layer after its prefill, and decode-time eviction.

Layers now hold different entries than the logical sequence, so transformers' mask does not fit them:

* one token at a time (the decoding step), a layer is in fixed-shape slots (:mod:`kvcake.engines.transformers.slots`):
  the query's attention over every slot is computed once, in float32, with the free slots masked; the layer's output
  and the eviction scores both come from it, and the entries the method drops are freed in place
  (:func:`attend_slots`: no host synchronisation, no changing shape, so the step compiles);
* several tokens at once after prefill (a question fed after a compressed context), the layer is in the prefill
  layout and builds its own mask from the original positions of its entries (:func:`attend_compressed`).

What to keep is the method's decision (the decode schedule of :mod:`kvcake.methods.budget`, the scorer's scores,
:func:`kvcake.methods.decoding.select_drops`); this module applies it to the storage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcake.engines.transformers.cache import KVCakeCache
from kvcake.engines.transformers.ops import slot_attention
from kvcake.engines.transformers.slots import Slots
from kvcake.engines.transformers.storage import CompressedLayer
from kvcake.methods.decoding import lowest_candidate, select_drops
from kvcake.methods.views import DecodeView


# -- one token at a time: fixed-shape slots ----------------------------------------------------------------------------
def attend_slots(cache: KVCakeCache, layer_idx: int, base: str, query: torch.Tensor, scaling: float,
                 softcap: float | None):
    """The decoding step of a frozen layer: attention over its slots, then the method's decode-time eviction."""
    layer = cache.layers[layer_idx]
    assert isinstance(layer, CompressedLayer) and layer.slots is not None
    slots = layer.slots
    batch, q_heads = query.shape[:2]
    kv_heads, capacity = slots.positions.shape[1], slots.capacity
    groups = q_heads // kv_heads
    # probs: (B, Hkv, G, C)
    out, probs = slot_attention(query, slots.keys, slots.values, slots.positions, scaling, softcap)
    group = cache.layer_groups.get(layer_idx)
    if group is not None and base != "eager":
        # Scored with the other evicting layers after the last of them attended (LayerGroup).
        if group.collect(layer_idx, probs.view(batch, q_heads, capacity)):
            with torch.no_grad():
                group.evict()
        cache.end_layer(layer_idx, True, out)
        return out, None
    if slots.next_slot is not None:
        slots.next_slot = None  # grouped, but under eager (which returns every layer's weights): on its own
    evict = slots.targets is not None
    track = cache.tracks_scores()  # H2O accumulates at every step, evicting or not
    ordered_probs = None
    if evict or track or base == "eager":
        order = slots.order()
        ordered_probs = probs.gather(-1, order.unsqueeze(2).expand(batch, kv_heads, groups, capacity)).view(
            batch, q_heads, capacity)
        if evict or track:
            with torch.no_grad():
                _score_and_drop(cache, slots, query, scaling, softcap, order, ordered_probs, evict, track)
    cache.end_layer(layer_idx, evict or track, out)
    # eager also returns the weights (output_attentions): over the slots in position order, free slots first.
    return out, (ordered_probs.unsqueeze(2).to(query.dtype) if base == "eager" and ordered_probs is not None else None)


def _score_and_drop(cache: KVCakeCache, slots: Slots, query, scaling, softcap, order, ordered_probs, evict: bool,
                    track: bool) -> None:
    """Score the entries in position order; keep the scores (H2O) and free the slots the method drops."""
    method = cache.method
    positions = slots.positions.gather(-1, order)
    occupied = positions >= 0
    stored = None if slots.stored is None else slots.stored.gather(-1, order)
    index = order.unsqueeze(-1)
    view = DecodeView(query=query, scaling=scaling, softcap=softcap, positions=positions, allowed=occupied,
                      stored=stored, probs=ordered_probs, window=method.window,
                      read_keys=lambda: slots.keys.gather(2, index.expand_as(slots.keys)),
                      read_values=lambda: slots.values.gather(2, index.expand_as(slots.values)))
    scores = method.scorer.decode(view)
    if track and slots.stored is not None:
        slots.stored.scatter_(-1, order, scores.to(slots.stored.dtype))
    if not evict:
        return
    if slots.max_drops <= 1:
        # One entry at most: its slot is found through the order and freed directly (no mask over every slot).
        lowest = lowest_candidate(scores, occupied, method.window)  # (B, Hkv, 1), in position order
        chosen = (slots.count > slots.target()).unsqueeze(-1) & occupied.gather(-1, lowest)
        slots.drop_one(order.gather(-1, lowest), chosen)
        return
    drops = (slots.count - slots.target()).clamp_min(0)  # (B, Hkv)
    dropped = select_drops(scores, occupied, drops, method.window, slots.max_drops)
    slots.drop(torch.zeros_like(dropped).scatter(-1, order, dropped))


# -- several tokens at once: the prefill layout -----------------------------------------------------------------------
def attend_compressed(cache: KVCakeCache, layer_idx: int, base: str, own: Callable, score_args: tuple, module,
                      query, key, value, attention_mask, /, *args, **kwargs):
    """The attention call of a compressed layer in the prefill layout after its prefill (and its eviction)."""
    scaling, softcap = score_args
    layer = cache.layers[layer_idx]
    assert isinstance(layer, CompressedLayer)
    q_len = query.shape[2]
    method = cache.method
    evict, targets = False, None
    if cache.decoding():
        targets = [row[cache.slot_of(layer_idx)] for row in cache.decode_targets(layer.appended)]
        evict = any(v > t for v, t in zip(layer.valid_counts or [], targets, strict=True))
    track = cache.tracks_scores()
    if layer.positions is None and not (evict or track):
        # Untouched layer: transformers' own mask is right for it.
        out = own(module, query, key, value, attention_mask, *args, **kwargs)
        cache.end_layer(layer_idx, False, out)
        return out
    allowed = layer.layer_mask(attention_mask, q_len)  # (B, Hkv, q, L), entries in position order
    out = _run_masked(base, own, module, query, key, value, allowed, *args, **kwargs)
    if evict or track:
        with torch.no_grad():
            last = allowed[:, :, -1]
            view = DecodeView(query=query, scaling=scaling, softcap=softcap, positions=layer.position_table(),
                              allowed=last, stored=layer.scores, window=method.window, read_keys=lambda: key,
                              read_values=lambda: value)
            scores = method.scorer.decode(view)
            if track:
                layer.scores = scores
            if evict:
                assert targets is not None and layer.valid_counts is not None
                keep = [min(v, t) for v, t in zip(layer.valid_counts, targets, strict=True)]
                layer.keep(keep, layer.ranking(scores.masked_fill(~last, float("-inf")), method.window))
    cache.end_layer(layer_idx, evict or track, out)
    return out


def _run_masked(base, own, module, query, key, value, allowed, /, *args, **kwargs):
    """Call the backend with a per-layer bool mask ``(B, Hkv, q, L)`` (None: every entry is visible)."""
    q_heads, kv_heads = query.shape[1], key.shape[1]
    q_len = query.shape[2]
    if allowed is None or q_len == 1 and bool(allowed.all()):
        mask = None  # every stored entry is visible to the single query: no mask needed by any backend
    else:
        mask = allowed.repeat_interleave(q_heads // kv_heads, dim=1) if kv_heads > 1 else allowed
        if base == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
        elif base != "sdpa":
            # Flash-attention takes no per-head mask: fall back to sdpa for this call (documented).
            own = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return own(module, query, key, value, mask, *args, **kwargs)


__all__ = ["attend_compressed", "attend_slots"]
