"""Window attention and CAKE's statistics computed from it.

Everything here is pure torch: no transformers import. Shapes follow transformers' conventions:
queries ``(batch, q_heads, q_len, head_dim)``, keys ``(batch, kv_heads, seq, head_dim)``.

Reference: Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", ICLR 2025,
sections 3.1 (preference), 3.3 (eviction indicator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class NonFiniteAttentionError(FloatingPointError):
    """Raised when attention scores contain NaN or infinity (never silently evict on garbage)."""


def window_attention(
    query_window: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the last ``W`` queries over all ``S`` keys, in float32.

    Parameters
    ----------
    query_window : Tensor ``(B, Hq, W, D)``
        Post-RoPE queries of the observation window (the last ``W`` prompt positions).
    keys : Tensor ``(B, Hkv, S, D)``
        Post-RoPE keys of the whole prompt, stored per KV head (never expanded).
    scaling : float
        The layer's softmax scaling (``head_dim ** -0.5`` for most models).
    key_valid : bool Tensor ``(B, S)``, optional
        False for padding columns. Their probability is exactly zero.
    softcap : float, optional
        Gemma-2 style logit soft-capping.

    Returns
    -------
    Tensor ``(B, Hq, W, S)`` float32: softmax over keys, causal inside the last ``W x W`` block.

    Raises
    ------
    NonFiniteAttentionError
        If a logit is NaN or infinite.
    """
    batch, q_heads, window, dim = query_window.shape
    kv_heads, seq = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    # Group the query heads of each KV head so that keys are never repeated.
    q = query_window.float().reshape(batch, kv_heads, groups * window, dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling
    logits = logits.reshape(batch, q_heads, window, seq)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if not torch.isfinite(logits).all():
        raise NonFiniteAttentionError(
            "attention logits of the observation window contain NaN or inf; refusing to score tokens on them"
        )
    q_pos = torch.arange(seq - window, seq, device=keys.device)
    allowed = torch.arange(seq, device=keys.device)[None, :] <= q_pos[:, None]  # (W, S)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].to(keys.device)
    # A finite fill keeps fully masked rows (padding queries) from turning into NaN; masked columns get exactly 0.
    logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    return probs * allowed


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last axis, stride 1, same length, zero padding counted (as the authors)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    if scores.dim() == 3:  # (N, C, L) is what avg_pool1d takes: each row is pooled on its own, no reshape needed
        return F.avg_pool1d(scores, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled.reshape(shape)


def group_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average per-query-head scores ``(B, Hq, N)`` over each GQA group -> ``(B, Hkv, N)``."""
    batch, q_heads, n = scores.shape
    return scores.reshape(batch, kv_heads, q_heads // kv_heads, n).mean(dim=2)


@dataclass
class WindowStatistics:
    """What CAKE needs from one layer's window attention.

    Attributes
    ----------
    entropy : Tensor ``(B,)`` float64
        Spatial dispersion H = -sum W log W over heads, window rows and non-window keys.
    variance : Tensor ``(B,)`` float64
        Temporal shift V = sum over heads and keys of the unbiased variance across window rows.
    mean, row_var : Tensor ``(B, Hq, S - W)`` float32
        Per query head and non-window key: mean and unbiased variance over the window rows.
    """

    entropy: torch.Tensor
    variance: torch.Tensor
    mean: torch.Tensor
    row_var: torch.Tensor

    def indicator(self, gamma: float, kernel: int, kv_heads: int) -> torch.Tensor:
        """CAKE's eviction indicator ``(B, Hkv, S - W)``: mean + gamma * var, pooled, GQA-averaged."""
        return group_mean(pool_scores(self.mean + gamma * self.row_var, kernel), kv_heads)


def window_statistics(attn: torch.Tensor) -> WindowStatistics:
    """CAKE's layer statistics from window attention ``(B, Hq, W, S)``.

    Padding columns carry exactly zero probability, so they add nothing to H or V and look like the zero padding
    of the pooling; a padded row therefore gets the same statistics as when run alone.
    """
    window, seq = attn.shape[2], attn.shape[3]
    past = attn[..., : seq - window]  # window rows, keys before the window
    entropy = -torch.xlogy(past, past).sum(dim=(1, 2, 3)).double()
    if window > 1 and past.shape[-1] > 0:
        row_var = past.var(dim=2, unbiased=True)  # (B, Hq, S - W)
    else:
        row_var = torch.zeros_like(past[:, :, 0])
    variance = row_var.sum(dim=(1, 2)).double()
    return WindowStatistics(entropy=entropy, variance=variance, mean=past.mean(dim=2), row_var=row_var)


def layer_preference(entropy: torch.Tensor, variance: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """P = H^(1/tau1) * V^(1/tau2) (CAKE eq. 4; note the exponents are 1/tau)."""
    return entropy.clamp_min(0).pow(1.0 / tau1) * variance.clamp_min(0).pow(1.0 / tau2)


_UNREAD: dict[tuple, torch.Tensor] = {}


def _unread(like: torch.Tensor) -> torch.Tensor:
    """A one-element tensor for baddbmm's ignored input (beta=0), made once per device and dtype."""
    key = (like.device, like.dtype)
    if key not in _UNREAD:
        _UNREAD[key] = like.new_zeros(1, 1, 1)
    return _UNREAD[key]


def last_query_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, allowed: torch.Tensor | None,
                         softcap: float | None = None, check: bool = True) -> torch.Tensor:
    """Attention ``(B, Hq, L)`` of the newest query over stored keys, float32 (used by decode-time eviction).

    ``query`` is ``(B, Hq, q, D)``, ``keys`` ``(B, Hkv, L, D)``, ``allowed`` a bool mask ``(B, Hkv, q, L)`` or None.
    ``check=False`` leaves the NaN/inf check to the caller (to check once per step, not once per layer).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    q = (query if q_len == 1 else query[:, :, -1:]).reshape(batch * kv_heads, groups, dim)
    k = keys.reshape(batch * kv_heads, length, dim).transpose(1, 2)
    if q.dtype != torch.float32:  # (a no-op .float() still costs a dispatch per layer and step)
        q, k = q.float(), k.float()
    # One kernel for the product and the scaling (beta=0: the first argument is never read).
    logits = torch.baddbmm(_unread(q), q, k, beta=0.0, alpha=scaling).view(batch, kv_heads, groups, length)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, :, -1:, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    # NaN or +inf anywhere in a row's logits makes that row's softmax NaN: one check on the (smaller) output.
    if check and not torch.isfinite(probs.sum(dim=-1)).all():
        raise NonFiniteAttentionError("attention logits at decode time contain NaN or inf")
    if allowed is not None:
        probs = probs * allowed[:, :, -1:, :]
    return probs.reshape(batch, q_heads, length)
