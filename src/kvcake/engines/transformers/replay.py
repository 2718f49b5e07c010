"""One prefill, many methods: record a prompt's prefill once and compress it again under other methods.

A compressed prefill is exact: every layer attends over the whole prompt and eviction happens after the layer's
attention, so the hidden states, the logits and each layer's keys, values and queries do not depend on the method.
Recording those attention inputs once lets an evaluation grid build the cache of every method and budget for the
same prompt without running the model again; :func:`replay` feeds the recorded layers to a fresh cache in the same
order as the forward does (update, then score), so the cache it returns is the one a compressed forward gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from kvcake.engines.transformers.cache import REPLAY, KVCakeCache
from kvcake.engines.transformers.compat import cache_keyword, output_cache, text_config
from kvcake.engines.transformers.prefill import PrefillLayer, Recording
from kvcake.engines.transformers.session import compress


@dataclass
class PrefillRecord:
    """A prompt's prefill: the last position's logits and every layer's attention inputs."""

    logits: torch.Tensor  # (B, vocab) at the last prompt position
    layers: dict[int, PrefillLayer]
    length: int
    tail: int = 0  # tokens at the end left uncompressed (the ``tail`` protocol)

    def nbytes(self) -> int:
        tensors = [t for layer in self.layers.values() for t in (layer.key, layer.value, layer.query) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, method, queries: int | None = None, tail: int = 0,
                   attention_mask: torch.Tensor | None = None) -> tuple[PrefillRecord, KVCakeCache]:
    """Prefill ``input_ids`` compressed by ``method``; return the record and that method's cache.

    ``queries`` keeps only each layer's last that-many queries: enough for every method to be replayed whose
    window is at most that long and whose scorer reads only the window (not H2O, see :func:`queries_needed`); None
    keeps them all (a prompt's queries weigh as much as its keys and values together, or more).

    ``method`` None prefills a full cache and records only the logits (nothing to replay from it). ``tail``: the
    last this-many prompt tokens are left uncompressed (see ``compress(uncompressed_tail=...)``), for every method
    replayed from the record. ``attention_mask`` ``(B, S)``, 0 on the padding: a left-padded batch, each row at its
    own positions ``0 .. n_r - 1`` (each row compressed as if it ran alone).
    """
    inputs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    if method is None:
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        record = PrefillRecord(logits=out.logits[:, -1].float(), layers={}, length=input_ids.shape[1], tail=tail)
        return record, output_cache(out)
    with compress(model, method, uncompressed_tail=tail) as press:
        cache = press.new_cache()
        recording = cache.recording = Recording(queries=None if queries is None else queries + tail)
        out = model(**inputs, **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
        layers, cache.recording = recording.layers, None
    if len(layers) != len(cache.layers):
        raise RuntimeError(f"recorded {len(layers)} of {len(cache.layers)} layers: the model bypassed the cache")
    record = PrefillRecord(logits=out.logits[:, -1].float(), layers=layers, length=input_ids.shape[1], tail=tail)
    return record, output_cache(out) or cache


def queries_needed(methods) -> int | None:
    """How many trailing queries a record must keep to replay every one of ``methods`` (None: all)."""
    methods = [m for m in methods if m is not None]
    if not methods or any(getattr(m.scorer, "all_queries", True) for m in methods):
        return None
    return max(m.window for m in methods)


@torch.no_grad()
def replay(model, record: PrefillRecord, method) -> DynamicCache:
    """The cache a prefill compressed by ``method`` would leave (``None``: the full cache)."""
    config = text_config(model)
    cache = DynamicCache(config=config) if method is None else KVCakeCache(config=config, method=method)
    if isinstance(cache, KVCakeCache):
        cache.settings.tail = record.tail
        cache.feeder = REPLAY  # fed here without a forward; decoding goes on inside a compress block
    try:
        for layer_idx in sorted(record.layers):
            layer = record.layers[layer_idx]
            # Entries may be reordered or shrunk in place while decoding: give every cache its own copy.
            key, value = cache.update(layer.key.clone(), layer.value.clone(), layer_idx)
            if isinstance(cache, KVCakeCache) and layer.query is not None and cache.compressed_layer(layer_idx):
                assert layer.scaling is not None
                cache.prefill_layer(layer_idx, layer.query, key, value, layer.key_valid, layer.scaling,
                                    layer.softcap, layer.positions, layer.rotary)
    finally:
        if isinstance(cache, KVCakeCache):
            cache.feeder = None
    return cache
