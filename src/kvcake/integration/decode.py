"""Attention over a compressed layer after its prefill, and decode-time eviction.

Layers now have different lengths and transformers' mask is built for the logical sequence, so each compressed layer
builds its own mask from the original positions of the entries it kept. On decoding steps where the layer must score
its entries anyway (decode-time eviction, H2O's accumulation), the single query's attention is computed once, in
float32, and both the layer's output and the eviction scores come from it. What to keep is the method's decision
(:mod:`kvcake.methods.budget` for the targets, the scorer for the scores); this module applies it to the storage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcake.integration.cache import KVCakeCache
from kvcake.integration.storage import CompressedLayer
from kvcake.methods.attention import attention_probs
from kvcake.methods.views import DecodeView


def attend_compressed(cache: KVCakeCache, layer_idx: int, base: str, own: Callable, score_args: tuple, module,
                      query, key, value, attention_mask, /, *args, **kwargs):
    """The attention call of a compressed layer after its prefill (and the layer's decode-time eviction)."""
    scaling, softcap = score_args
    layer = cache.layers[layer_idx]
    assert isinstance(layer, CompressedLayer)
    q_len = query.shape[2]
    method = cache.method
    evict, targets = False, None
    if cache.decoding():
        targets = [row[cache._slot[layer_idx]] for row in cache.decode_targets(layer.seen)]
        evict = any(v > t for v, t in zip(layer.valid_counts or [], targets, strict=True))
    track = cache.decoding() and method.scorer.keeps_scores  # H2O accumulates at every step, evicting or not
    if layer.positions is None and not (evict or track):
        # Untouched layer: transformers' own mask is right for it.
        out = own(module, query, key, value, attention_mask, *args, **kwargs)
        cache.end_layer(layer_idx, False, out)
        return out

    # A single new query of a one-row batch without filler slots sees every stored entry: no mask to build.
    plain = q_len == 1 and query.shape[0] == 1 and not layer.has_fillers
    allowed = None if plain else layer.layer_mask(attention_mask, q_len)  # (B, Hkv, q, L), entries in position order
    # Keys and values may sit in slot order (see storage.py); a single query only ever meets such a layer.
    in_slots = layer.to_slots(allowed)
    probs = None
    if (evict or track) and q_len == 1 and layer.positions is not None:
        # The scorer needs this query's attention anyway: compute it once and the output from it.
        out, slot_probs = _attend_one_query(query, key, value, in_slots, scaling, softcap)
        probs = layer.from_slots(slot_probs)
        # eager also returns the weights (output_attentions): over the entries in position order, like the mask.
        out = (out, probs.unsqueeze(2).to(query.dtype) if base == "eager" else None)
    elif layer.positions is None:
        out = own(module, query, key, value, attention_mask, *args, **kwargs)
    else:
        out = _run_masked(base, own, module, query, key, value, in_slots, *args, **kwargs)
    if evict or track:
        with torch.no_grad():
            _score_and_evict(cache, layer, query, score_args, allowed, probs, evict, track, targets)
    cache.end_layer(layer_idx, evict or track, out)
    return out


def _score_and_evict(cache: KVCakeCache, layer: CompressedLayer, query, score_args, allowed, probs, evict: bool,
                     track: bool, targets: list[int] | None) -> None:
    """Score the layer's entries (in position order) and drop what exceeds the targets."""
    scaling, softcap = score_args
    method = cache.method
    last = None if allowed is None else allowed[:, :, -1]
    view = DecodeView(query=query, scaling=scaling, softcap=softcap, positions=layer.position_table(), allowed=last,
                      stored=layer.scores, probs=probs, read_keys=lambda: layer.entries()[0],
                      read_values=lambda: layer.entries()[1])
    scores = method.scorer.decode(view)
    if track:
        layer.scores = scores
    if not evict:
        return
    assert targets is not None and layer.valid_counts is not None
    if last is not None:
        scores = scores.masked_fill(~last, float("-inf"))
    keep = [min(v, t) for v, t in zip(layer.valid_counts, targets, strict=True)]
    if not layer.has_fillers and all(v - k == 1 for v, k in zip(layer.valid_counts, keep, strict=True)):
        layer.drop_lowest(scores, method.window)
    else:
        layer.keep(keep, layer.ranking(scores, method.window))


def _attend_one_query(query, key, value, allowed, scaling, softcap):
    """Attention of a single new query over the stored entries, float32 probabilities, KV heads never repeated.

    Returns the backend-shaped output ``(B, 1, Hq, D)`` and the probabilities ``(B, Hq, L)`` for the scorer.
    """
    batch, q_heads, _, _ = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    mask = None if allowed is None else allowed[:, :, None, -1:, :]
    probs = attention_probs(query, key, scaling, mask, softcap, check=False)[:, :, 0]  # (B, Hq, L)
    grouped = probs.view(batch, kv_heads, q_heads // kv_heads, length)
    if value.dtype != grouped.dtype:
        grouped = grouped.to(value.dtype)
    # (B, Hkv, G, D) is laid out as (B, Hq, D): the backend shape (B, 1, Hq, D) is a view of it.
    out = torch.matmul(grouped, value).view(batch, 1, q_heads, -1)
    return (out if out.dtype == query.dtype else out.to(query.dtype)), probs


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


__all__ = ["attend_compressed"]
