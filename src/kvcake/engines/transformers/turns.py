"""What a kvcake cache needs to go on from one call to the next: a chat's next turn, compiled decoding across turns,
and cropping (the rejected draft tokens of prompt-lookup and assisted decoding).

A kvcake cache is fed only while a compress block's forward runs it (:attr:`KVCakeCache.feeder`): anywhere else its
compressed layers, or its fixed-shape decoding buffers with their free slots, would be read as a full cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

from kvcake.engines.transformers.errors import UnsupportedCacheError
from kvcake.engines.transformers.state import Phase

if TYPE_CHECKING:
    from kvcake.engines.transformers.cache import KVCakeCache

#: What a forward that is not a compress block's hears when it meets a kvcake cache.
UNFED = ("a kvcake cache is fed only inside a kvcake.compress block of its model and method: outside one, the model "
         "would read its compressed entries as a plain cache and answer wrongly; continue it inside "
         "`with kvcake.compress(model, method):` (the block it came from, or a new one with an equal method)")


def refreeze(cache: KVCakeCache) -> None:
    """After a forward of the block: a compiled-decoding cache that was fed several tokens after its prefill (a chat's
    next turn) goes back into its decoding buffers now, outside compiled code, as it did after its prefill."""
    if (cache.settings.freeze_after_prefill and cache.request.phase is Phase.PREFILLED
            and not torch.compiler.is_compiling()):
        cache.ensure_frozen()


def sync_lengths(cache: KVCakeCache) -> None:
    """Read each decoding layer's logical length back from its device cursor: compiled steps cannot update the host's
    count, and the next call (a chat's next turn through ``generate``) reads ``get_seq_length()``."""
    for layer in cache.layers_in_order():
        if layer.slots is not None:
            layer.appended = layer.logical_length()


def crop(cache: KVCakeCache, max_length: int) -> None:
    """Forget the newest ``-max_length`` tokens (transformers' convention: a count <= 0).

    Exact for methods that evict nothing while decoding (prefill-only: SnapKV, PyramidKV, ...): after the prefill
    their layers only grow, so dropping the newest entries leaves what the cache held before those tokens came.
    Refused (:class:`UnsupportedCacheError`) for a method with decode-time eviction once a layer was compressed, laid
    out for decoding or given scores: the entries the draft tokens made it evict, and the scores they changed, cannot
    be restored when the drafts are rejected, so the answer would differ from ordinary decoding's without a word.
    Cropping into the compressed prompt is refused too (its budgets were allocated for the whole prompt).
    """
    if max_length > 0:
        raise ValueError(f"crop takes the number of tokens to remove as a count <= 0, got {max_length}")
    if max_length == 0:
        return
    layers = cache.layers_in_order()
    touched = any(layer.positions is not None or layer.slots is not None for layer in layers)
    if cache.method.decode_eviction and (touched or any(layer.scores is not None for layer in layers)):
        raise UnsupportedCacheError(
            f"cropping a kvcake cache under {cache.method.name} with decode-time eviction is not supported: the "
            "entries evicted for the dropped (draft) tokens cannot be restored, so prompt-lookup or assisted decoding "
            "would not give the tokens of ordinary decoding; build the method with decode_eviction=False, or decode "
            "without draft tokens")
    keep = (layers[0].logical_length() if layers else cache.get_seq_length()) + max_length
    prefill = cache.plan.prefill_length if cache.plan is not None else 0
    if touched and keep < prefill:
        raise UnsupportedCacheError(f"cannot crop a kvcake cache to {keep} tokens, inside its compressed prompt of "
                                    f"{prefill}: start a new request instead")
    DynamicCache.crop(cache, max_length)


__all__ = ["UNFED", "crop", "refreeze", "sync_lengths"]
