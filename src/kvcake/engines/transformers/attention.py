"""An attention function that wraps the model's own backend (eager, sdpa, flash-attention).

Registered in transformers' ``AttentionInterface`` under ``kvcake_<backend>`` the first time a compression starts
(never at import), with the backend's own mask builder, so transformers prepares exactly the mask it would for the
backend. The compression's forward pre-hook passes the request's cache to it as the keyword argument
:data:`CACHE_KWARG` (transformers hands a model forward's extra keyword arguments down to every attention call), so
the wrapper needs no global state. It sees post-RoPE queries and the layer's cached keys, so it can

* during prefill: run the backend unchanged (prefill outputs are exact), then score the layer from its window
  attention and let the cache evict (cascade);
* afterwards: attend over the entries the layer kept with the layer's own mask
  (:mod:`kvcake.engines.transformers.decode`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcake.engines.transformers.cache import KVCakeCache
from kvcake.engines.transformers.decode import attend_compressed, attend_slots
from kvcake.engines.transformers.rope import rotary_for

PREFIX = "kvcake_"
#: The keyword argument that carries the request's cache from the model's forward down to the attention calls.
CACHE_KWARG = "kvcake_cache"


def base_function(name: str, module: torch.nn.Module) -> Callable:
    """The model's own attention function for backend ``name``."""
    if name == "eager":
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward

            return eager_attention_forward
        return own
    function: Callable = ALL_ATTENTION_FUNCTIONS[name]
    return function


def registered_name(base: str) -> str:
    """Register (once) the kvcake wrapper for backend ``base`` and return its name."""
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS and base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_name(registered: str | None) -> str | None:
    """The backend a registered kvcake name wraps (None if the name is not kvcake's)."""
    return registered[len(PREFIX):] if registered and registered.startswith(PREFIX) else None


def _make_wrapper(base: str) -> Callable:
    def kvcake_attention(module, query, key, value, attention_mask, *args, **kwargs):
        cache = kwargs.pop(CACHE_KWARG, None)
        own = base_function(base, module)
        layer_idx: int = module.layer_idx
        layer = cache.compressed_layer(layer_idx) if isinstance(cache, KVCakeCache) else None
        if layer is None or kwargs.get("sliding_window") is not None:
            if isinstance(cache, KVCakeCache):
                cache.record(layer_idx, key, value)
            return own(module, query, key, value, attention_mask, *args, **kwargs)
        q_len = query.shape[2]
        scaling = kwargs.get("scaling", getattr(module, "scaling", query.shape[-1] ** -0.5))
        softcap = kwargs.get("softcap")
        if layer.slots is not None:  # decoding one token at a time, in fixed-shape slots
            return attend_slots(cache, layer_idx, base, query, scaling, softcap)
        if layer.awaits_prefill(q_len):
            out = own(module, query, key, value, attention_mask, *args, **kwargs)
            valid = cache.prefill_key_valid(attention_mask, key.shape[2])
            positions, rotary = kwargs.get("position_ids"), rotary_for(module)
            cache.record(layer_idx, key, value, query, valid, scaling, softcap, positions, rotary)
            cache.prefill_layer(layer_idx, query, key, value, valid, scaling, softcap, positions, rotary)
            return out
        return attend_compressed(cache, layer_idx, base, own, (scaling, softcap), module, query, key, value,
                                 attention_mask, *args, **kwargs)

    kvcake_attention.__name__ = f"kvcake_{base}_attention"
    return kvcake_attention


__all__ = ["CACHE_KWARG", "PREFIX", "base_function", "base_name", "registered_name"]
