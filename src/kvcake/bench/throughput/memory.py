"""The KV memory budget: bytes per token of a model, and a pool sized for a number of full-cache requests."""

from __future__ import annotations

import math

#: Tokens per block of vLLM's CPU KV pool (its default there); pools are sized in whole blocks for every engine.
BLOCK_TOKENS = 128


def bytes_per_token(config, dtype_bytes: int) -> int:
    """Key and value bytes one token occupies over all layers of a plain (full-attention) cache."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(text.num_hidden_layers) * int(heads) * int(head_dim) * 2 * int(dtype_bytes)


def pool_bytes(full_requests: float, longest_tokens: int, per_token: int) -> int:
    """A pool holding ``full_requests`` full-cache requests of ``longest_tokens`` tokens (prompt and answer), each
    rounded up to whole blocks of :data:`BLOCK_TOKENS`."""
    if full_requests <= 0:
        raise ValueError(f"the pool must hold a positive number of full-cache requests, got {full_requests}")
    blocks = math.ceil(longest_tokens / BLOCK_TOKENS)
    return int(math.floor(full_requests * blocks)) * BLOCK_TOKENS * per_token


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"
