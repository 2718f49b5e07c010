"""Attention probabilities and the small tensor operations every scorer shares.

One function, :func:`attention_probs`, computes softmax attention of queries over stored keys in float32, grouping
the query heads of each KV head so that keys are never repeated; window attention (prefill), H2O's accumulated
attention (blocks of prompt queries) and a decoding query's attention are all calls of it with their own masks.
Shapes follow transformers: queries ``(B, Hq, q, D)``, keys ``(B, Hkv, L, D)``.
"""

from __future__ import annotations

from kvcake._lazy import torch


class NonFiniteAttentionError(FloatingPointError):
    """Raised when attention scores contain NaN or infinity (never silently evict on garbage)."""


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None,
                    softcap: float | None = None, check: bool = True) -> torch.Tensor:
    """Softmax attention ``(B, Hq, q, L)`` in float32 of ``query`` over ``keys``.

    Parameters
    ----------
    query : Tensor ``(B, Hq, q, D)``
        Post-RoPE queries.
    keys : Tensor ``(B, Hkv, L, D)``
        Post-RoPE keys per KV head (never expanded to the query heads).
    scaling : float
        The layer's softmax scaling.
    allowed : bool Tensor, optional
        Which keys each query may attend to, broadcastable to ``(B, Hkv, 1, q, L)``: ``(q, L)``, ``(B, 1, 1, q, L)``
        or ``(B, Hkv, 1, q, L)``. Masked keys get exactly zero probability; a fully masked row (a padding query) gets
        zeros, never NaN.
    softcap : float, optional
        Gemma-2 style logit soft-capping.
    check : bool
        Raise :class:`NonFiniteAttentionError` if a logit is NaN or infinite (``False`` leaves the check to the
        caller, e.g. once per decoding step instead of once per layer).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    q = query.float().reshape(batch, kv_heads, groups * q_len, dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2))
    return probs_from_logits(logits.view(batch, kv_heads, groups, q_len, length), scaling, allowed, softcap, check)


def probs_from_logits(logits: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None,
                      softcap: float | None = None, check: bool = True) -> torch.Tensor:
    """The second half of :func:`attention_probs`, for an engine that computed the unscaled float32 products
    ``q·k`` itself: ``logits`` ``(B, Hkv, groups, q, L)`` (query head ``h`` is group ``h % groups`` of KV head
    ``h // groups``); the other arguments and the result as :func:`attention_probs`."""
    batch, kv_heads, groups, q_len, length = logits.shape
    logits = logits * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if check and not torch.isfinite(logits).all():
        raise NonFiniteAttentionError("attention logits contain NaN or inf; refusing to score tokens on them")
    if allowed is not None:
        logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    if allowed is not None:
        probs = probs * allowed
    return probs.view(batch, kv_heads * groups, q_len, length)


def causal_allowed(q_positions: torch.Tensor, key_positions: torch.Tensor,
                   key_valid: torch.Tensor | None = None, query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask ``(B|1, 1, 1, q, L)`` for :func:`attention_probs`: key position <= query position, padding out.

    ``q_positions`` ``(q,)`` and ``key_positions`` ``(L,)`` are positions in the logical sequence; ``key_valid``
    ``(B, L)`` and ``query_valid`` ``(B, q)`` are False on padding.
    """
    allowed = key_positions[None, :] <= q_positions[:, None]  # (q, L)
    allowed = allowed[None, None, None]
    if key_valid is not None:
        allowed = allowed & key_valid.to(allowed.device)[:, None, None, None, :]
    if query_valid is not None:
        allowed = allowed & query_valid.to(allowed.device)[:, None, None, :, None]
    return allowed


def window_attention(query_window: torch.Tensor, keys: torch.Tensor, scaling: float,
                     key_valid: torch.Tensor | None = None, softcap: float | None = None,
                     check: bool = True) -> torch.Tensor:
    """Attention ``(B, Hq, W, S)`` of the last ``W`` prompt queries over all ``S`` keys, float32, causal inside the
    last ``W x W`` block; padding columns (``key_valid`` False) get exactly zero probability. ``check``: raise on
    NaN/inf logits now (False: a NaN or inf logit makes the probabilities NaN, for the caller to check later)."""
    seq, window = keys.shape[2], query_window.shape[2]
    positions = torch.arange(seq, device=keys.device)
    allowed = causal_allowed(positions[seq - window:], positions, key_valid)
    return attention_probs(query_window, keys, scaling, allowed, softcap, check)


def accumulated_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                          key_valid: torch.Tensor | None = None, softcap: float | None = None,
                          block: int | None = None, check: bool = True) -> torch.Tensor:
    """Column sums ``(B, Hq, S)`` of the full causal attention of every prompt query (H2O's scores).

    Computed in blocks of queries, each materialising at most about 2^26 float32 logits, so long prompts never need
    the S x S matrix. Padding queries and keys contribute nothing.
    """
    batch, q_heads, seq, _ = query.shape
    if block is None:
        block = max(1, min(seq, (1 << 26) // max(1, batch * q_heads * seq)))
    positions = torch.arange(seq, device=keys.device)
    total = torch.zeros(batch, q_heads, seq, dtype=torch.float32, device=keys.device)
    for start in range(0, seq, block):
        stop = min(seq, start + block)
        rows = None if key_valid is None else key_valid[:, start:stop]
        allowed = causal_allowed(positions[start:stop], positions, key_valid, rows)
        total += attention_probs(query[:, :, start:stop], keys, scaling, allowed, softcap, check).sum(dim=2)
    return total


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str = "avg") -> torch.Tensor:
    """Pooling along the last axis, stride 1, same length.

    ``avg`` counts the zero padding (as CAKE's and SnapKV's authors do); ``max`` pads with -inf.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores if scores.dim() == 3 else scores.reshape(-1, 1, shape[-1])  # (N, C, L): rows pooled on their own
    if pooling == "max":
        # The maximum over shifted views of the -inf-padded scores: exactly max_pool1d's values, but with slices
        # only, so that compiled decoding keeps the entry axis dynamic (max_pool1d specialises it to a constant).
        radius = kernel // 2
        padded = torch.nn.functional.pad(flat, (radius, radius), value=float("-inf"))
        length = flat.shape[-1]
        pooled = padded[..., :length]
        for shift in range(1, kernel):
            pooled = torch.maximum(pooled, padded[..., shift:shift + length])
    else:
        # The sum of shifted views of the zero-padded scores, left to right, over the kernel: avg_pool1d's values
        # bit for bit (it adds the window in the same order and divides by the kernel), at a seventh of its time on
        # the CPU (tests/test_scoring.py).
        radius = kernel // 2
        padded = torch.nn.functional.pad(flat, (radius, radius))
        length = flat.shape[-1]
        total = padded[..., :length] + padded[..., 1:1 + length]
        for shift in range(2, kernel):
            total = total + padded[..., shift:shift + length]
        pooled = total / kernel
    return pooled if scores.dim() == 3 else pooled.reshape(shape)


def group_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average per-query-head scores ``(B, Hq, N)`` over each GQA group -> ``(B, Hkv, N)``."""
    batch, q_heads, n = scores.shape
    return scores.reshape(batch, kv_heads, q_heads // kv_heads, n).mean(dim=2)


def check_kernel(kernel: int) -> None:
    """Pooling kernels are positive odd integers (so that pooling keeps the length)."""
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd integer, got {kernel!r}")


__all__ = ["NonFiniteAttentionError", "accumulated_attention", "attention_probs", "causal_allowed", "check_kernel",
           "group_mean", "pool_scores", "probs_from_logits", "window_attention"]
