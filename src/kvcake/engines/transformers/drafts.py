"""Assisted and prompt-lookup decoding under a compress block: telling such a ``generate`` call apart, and splitting
its first forward (the prompt and the first draft tokens at once) into the prompt's prefill and the drafts.

Transformers verifies draft tokens by feeding them after the sequence and cropping the cache back
(``cache.crop``) to drop the rejected ones. On its first step it feeds the prompt and the drafts together, which would
compress the drafts into the prompt and let them attend over the uncompressed prompt; the session prefills the prompt
alone first, so that every token is the one ordinary greedy decoding gives.
"""

from __future__ import annotations

from typing import Any

import torch

#: Why decode-time eviction refuses draft tokens (formatted with the method's name).
REFUSAL = ("assisted and prompt-lookup decoding are not supported under {name} with decode-time eviction: the entries "
           "evicted for draft tokens cannot be restored when the drafts are rejected, so the tokens would not be "
           "those of ordinary decoding; build the method with decode_eviction=False (prefill-only), or decode "
           "without draft tokens")

#: Forward arguments laid out along the sequence, cut at the end of the prompt.
SEQUENCE_ARGUMENTS = ("input_ids", "position_ids", "cache_position")


def assisted(model: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a ``generate(**kwargs)`` call decodes with draft tokens (an assistant model or prompt lookup)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    return lookup is not None or kwargs.get("assistant_model") is not None


def prompt_length(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Tokens of the prompt a ``generate`` call was given (None if it was not given as token ids)."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    return inputs.shape[-1] if isinstance(inputs, torch.Tensor) else None


def split(args: tuple, kwargs: dict[str, Any], prompt: int) -> tuple[dict, tuple, dict] | None:
    """A forward's arguments cut at ``prompt``: the prompt's prefill (keyword arguments), then the drafts' (positional
    and keyword). None when the forward is no longer than the prompt (no drafts came with it)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.shape[-1] <= prompt:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("assisted decoding under kvcake needs a 2-D attention mask (batch, sequence)")
    first: dict[str, Any] = {"input_ids": ids[:, :prompt]}
    rest = dict(kwargs)
    rest_args = args
    if "input_ids" not in kwargs:
        rest_args = (ids[:, prompt:], *args[1:])
    for name in SEQUENCE_ARGUMENTS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            first[name], rest[name] = value[..., :prompt], value[..., prompt:]
    if mask is not None:
        first["attention_mask"] = mask[:, :prompt]  # the drafts' forward keeps the whole sequence's mask
    return first, rest_args, rest


__all__ = ["REFUSAL", "assisted", "prompt_length", "split"]
