"""An attention function that wraps the model's own backend (eager, sdpa, flash-attention).

Registered in transformers' ``AttentionInterface`` under ``kvcake_<backend>`` the first time a compression starts
(never at import), with the backend's own mask builder, so transformers prepares exactly the mask it would for the
backend. The wrapper sees post-RoPE queries and the layer's cached keys, so it can

* during prefill: run the backend unchanged (prefill outputs are exact), then score the layer from its window
  attention and let the cache evict (cascade);
* afterwards: build the layer's own mask from the original positions of the entries it kept, because layers now
  have different lengths and transformers' mask is built for the logical sequence.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcake.integration.cache import KVCakeCache
from kvcake.methods.scorers import DecodeView
from kvcake.methods.scoring import last_query_attention
from kvcake.methods.view import LayerView

PREFIX = "kvcake_"

#: id(attention module) -> the Compression attached to it (filled only while a ``with`` block is active).
ACTIVE: dict[int, object] = {}


def base_function(name: str, module: torch.nn.Module) -> Callable:
    """The model's own attention function for backend ``name``."""
    if name == "eager":
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is None:
            from transformers.models.llama.modeling_llama import (
                eager_attention_forward as own,
            )
        return own
    return ALL_ATTENTION_FUNCTIONS[name]


def registered_name(base: str) -> str:
    """Register (once) the kvcake wrapper for backend ``base`` and return its name."""
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS and base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _make_wrapper(base: str) -> Callable:
    def kvcake_attention(module, query, key, value, attention_mask, *args, **kwargs):
        compression = ACTIVE.get(id(module))
        cache = getattr(compression, "active_cache", None)
        own = base_function(base, module)
        layer_idx = getattr(module, "layer_idx", None)
        if (
            not isinstance(cache, KVCakeCache)
            or layer_idx not in cache._slot
            or kwargs.get("sliding_window") is not None
        ):
            if isinstance(cache, KVCakeCache) and cache.recorder is not None and layer_idx not in cache.recorder:
                cache.recorder[layer_idx] = PrefillLayer(key.clone(), value.clone())
            return own(module, query, key, value, attention_mask, *args, **kwargs)
        layer = cache.layers[layer_idx]
        q_len = query.shape[2]
        scaling = kwargs.get("scaling", getattr(module, "scaling", query.shape[-1] ** -0.5))
        softcap = kwargs.get("softcap")
        if layer.seen == q_len and layer.positions is None and layer.valid_counts is None:
            out = own(module, query, key, value, attention_mask, *args, **kwargs)
            key_valid = _key_valid(attention_mask, key.shape[2])
            if cache.recorder is not None:
                keep = cache.record_queries
                # A slice keeps the whole tensor alive: copy the rows kept so the full queries can be freed.
                q = query if keep is None or keep >= query.shape[2] else query[:, :, -keep:].clone()
                cache.recorder[layer_idx] = PrefillLayer(key.clone(), value.clone(), q, key_valid, scaling, softcap)
            score_prefill(cache, layer_idx, query, key, key_valid, scaling, softcap)
            return out
        return _attend_compressed(cache, layer_idx, base, own, (scaling, softcap), module, query, key, value,
                                  attention_mask, *args, **kwargs)

    kvcake_attention.__name__ = f"kvcake_{base}_attention"
    return kvcake_attention


def _key_valid(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Non-padding columns ``(B, S)`` of a prefill mask (the last query sees every real key), or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask.bool()
    else:
        last = attention_mask[:, 0, -1, :length]
        valid = last if last.dtype == torch.bool else last == 0
    return None if bool(valid.all()) else valid


@dataclass
class PrefillLayer:
    """What a layer's prefill attention call saw: enough to compress the layer again under another method."""

    key: torch.Tensor
    value: torch.Tensor
    query: torch.Tensor | None = None  # None for layers kvcake leaves alone (sliding-window)
    key_valid: torch.Tensor | None = None
    scaling: float | None = None
    softcap: float | None = None


@torch.no_grad()
def score_prefill(cache: KVCakeCache, layer_idx: int, query, key, key_valid, scaling, softcap) -> None:
    """Score a prefilled layer under the cache's method and let the cache evict (the cascade step)."""
    seq = key.shape[2]
    if cache.prompt_tokens is None:
        cache.start_prefill(key_valid, seq, key.shape[0])
    method = cache.method
    view = LayerView(query=query, keys=key, scaling=scaling, key_valid=key_valid, softcap=softcap,
                     layer=cache._slot[layer_idx], num_layers=len(cache.compressible))
    preference = method.allocator.preference(view, method.window)
    scores = method.scorer.prefill(view, method.window)
    cache.add_layer_scores(layer_idx, preference, scores, key_valid)


def _attend_compressed(cache, layer_idx, base, own, score_args, module, query, key, value, attention_mask, /,
                       *args, **kwargs):
    scaling, softcap = score_args
    layer = cache.layers[layer_idx]
    q_len = query.shape[2]
    method = cache.method
    decoding = method.decode_eviction and cache.prefill_kept is not None
    evict, targets = False, None
    if decoding:
        targets = [row[cache._slot[layer_idx]] for row in cache.decode_targets(layer.seen)]
        evict = any(v > t for v, t in zip(layer.valid_counts, targets))
    track = decoding and method.scorer.keeps_scores  # H2O accumulates at every step, evicting or not
    if layer.positions is None and not (evict or track):
        # Untouched layer: transformers' own mask is right for it.
        out = own(module, query, key, value, attention_mask, *args, **kwargs)
        cache.end_layer(layer_idx, False, out)
        return out

    # A single new query of a one-row batch without filler slots sees every stored entry: no mask to build.
    plain = q_len == 1 and query.shape[0] == 1 and not layer.has_fillers
    allowed = None if plain else layer.layer_mask(attention_mask, q_len)  # (B, Hkv, q, L), entries in position order
    # Keys and values may sit in slot order (see cache.py); a single query only ever meets such a layer.
    in_slots = layer.to_slots(allowed)
    probs = None
    if (evict or track) and q_len == 1 and layer.positions is not None:
        # The scorer needs this query's attention anyway: compute it once and the output from it.
        out, probs = _attend_one_query(query, key, value, in_slots, scaling, softcap)
        probs = layer.from_slots(probs)
        # eager also returns the weights (output_attentions): over the entries in position order, like the mask.
        out = (out, probs.unsqueeze(2).to(query.dtype) if base == "eager" else None)
    elif layer.positions is None:
        out = own(module, query, key, value, attention_mask, *args, **kwargs)
    else:
        out = _run_masked(base, own, module, query, key, value, in_slots, *args, **kwargs)
    if evict or track:
        with torch.no_grad():
            # With ``probs`` given, scorers read attention from it; keys only tell the number of KV heads.
            ctx = DecodeView(query=query, keys=key, scaling=scaling, softcap=softcap, allowed=allowed,
                             positions=layer.position_table(), stored=layer.scores, probs=probs)
            scores = method.scorer.decode(ctx)
            if track:
                layer.scores = scores
            if evict:
                if allowed is not None:
                    scores = scores.masked_fill(~allowed[:, :, -1], float("-inf"))
                keep = [min(v, t) for v, t in zip(layer.valid_counts, targets)]
                if not layer.has_fillers and all(v - k == 1 for v, k in zip(layer.valid_counts, keep)):
                    layer.drop_lowest(scores, method.window)
                else:
                    layer.keep(keep, layer.ranking(scores, method.window))
    cache.end_layer(layer_idx, evict or track, out)
    return out


def _attend_one_query(query, key, value, allowed, scaling, softcap):
    """Attention of a single new query over the stored entries, float32 probabilities, KV heads never repeated.

    Returns the backend-shaped output ``(B, 1, Hq, D)`` and the probabilities ``(B, Hq, L)`` for the scorer.
    """
    batch, q_heads, _, _ = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    probs = last_query_attention(query, key, scaling, allowed, softcap, check=False)  # (B, Hq, L)
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
