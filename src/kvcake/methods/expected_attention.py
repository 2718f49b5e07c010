"""Expected Attention: score each entry by the attention that *future* queries are expected to pay it.

Devoto et al., "Expected Attention: KV cache compression by estimating attention from future queries
distribution", 2025 (arXiv 2510.00636), as defined by NVIDIA kvpress 0.5.5 (``ExpectedAttentionPress``).

Queries before RoPE are modelled as Gaussian, ``q ~ N(mu, Sigma)``, with the mean and (biased) covariance of the
prompt's queries after the first ``n_sink`` tokens. A future query at position ``t`` is ``R_t q``; averaging the
rotation over the next ``n_future_positions`` positions, ``R = mean_t R_t``, gives ``mu' = R mu`` and
``Sigma' = R Sigma R^T``. For a key ``k`` (post-RoPE, as cached), ``q . k`` is then Gaussian and
``E[exp(s q.k)] = exp(s mu'.k + s^2/2 k^T Sigma' k)`` (``s`` the softmax scaling), so the expected logits are

    z_h(k) = s mu'_h . k + (s^2 / 2) k^T Sigma'_h k            (per query head h)

and the score of entry ``i`` of KV head ``j`` is

    score(i) = (mean over the query heads h of group j of softmax_i z_h + epsilon) * ||v_i||_2,

the softmax taken over the non-sink entries. The first ``n_sink`` tokens are kept (their score is the largest
score plus one). kvcake's wrapper sees post-RoPE queries only: the pre-RoPE queries are recovered exactly by
undoing the model's own rotation at each query's position (``LayerView.rotary``, ``LayerView.positions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kvcake._lazy import torch
from kvcake.methods.attention import NonFiniteAttentionError
from kvcake.methods.base import Method, Scorer
from kvcake.methods.cake import CAKE
from kvcake.methods.registry import register, register_composition

if TYPE_CHECKING:
    from kvcake.methods.views import DecodeView, LayerView

#: Elements of one float32 block (queries or keys times heads times head dim) processed at a time.
_BLOCK_ELEMENTS = 1 << 24


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for the halves ``x1, x2`` of the last dimension: RoPE's rotation partner."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: ``x`` ``(..., N, D)`` post-RoPE with tables ``cos``, ``sin`` ``(..., N, R)`` -> pre-RoPE ``x``.

    RoPE maps ``y = y cos + rotate_half(y) sin`` on the first ``R`` dims, where ``cos = a cos(theta)`` and
    ``sin = a sin(theta)`` carry the attention scaling ``a`` of YaRN/LongRoPE: the inverse is the transposed
    rotation divided by ``a^2 = cos^2 + sin^2``. Dimensions past ``R`` (partial rotary) are not rotated.
    """
    r = cos.shape[-1]
    rot = x[..., :r]
    out = (rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin)
    return torch.cat([out, x[..., r:]], dim=-1) if x.shape[-1] > r else out


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """The average RoPE matrix ``mean_t R_t`` ``(B, D, D)`` over tables ``cos``, ``sin`` ``(B, T, R)``.

    ``R_t y = y cos_t + rotate_half(y) sin_t`` is linear in ``(cos_t, sin_t)``, so the average matrix is built from
    the average tables; dimensions past ``R`` keep the identity.
    """
    c, s = cos.mean(dim=1), sin.mean(dim=1)  # (B, R)
    batch, r = c.shape
    half = r // 2
    matrix = torch.eye(dim, dtype=c.dtype, device=c.device).repeat(batch, 1, 1)
    idx = torch.arange(r, device=c.device)
    matrix[:, idx, idx] = c
    # Row i of diag(sin) @ P, where P y = rotate_half(y): -sin_i at column i + R/2 (first half), +sin_i at i - R/2.
    matrix[:, idx[:half], idx[:half] + half] = -s[:, :half]
    matrix[:, idx[half:], idx[half:] - half] = s[:, half:]
    return matrix


def _block(batch: int, heads: int, dim: int, seq: int) -> int:
    return max(1, min(seq, _BLOCK_ELEMENTS // max(1, batch * heads * dim)))


@dataclass(frozen=True)
class ExpectedAttentionScores(Scorer):
    """Expected attention of future queries times value norms (Devoto et al., 2025; kvpress 0.5.5's definition).

    Parameters
    ----------
    n_future_positions : int
        Future positions the RoPE rotation is averaged over (default 512).
    n_sink : int
        First real tokens of each row excluded from the query statistics and from the softmax, and always kept
        (default 4).
    use_covariance : bool
        Include the covariance term ``(s^2/2) k^T Sigma' k`` (default True); False uses the mean only.
    use_vnorm : bool
        Multiply by the value norms, ``(p + epsilon) * ||v||`` (default True).
    epsilon : float
        Added to the expected attention before the value-norm rescaling (default 0).

    Notes
    -----
    Prefill-only: the query statistics are those of the prompt, and no decode-time rule is defined (a method using
    this scorer must keep ``decode_eviction=False``). Logit soft-capping (Gemma-2) is not modelled: the expectation
    is that of uncapped logits.
    """

    n_future_positions: int = field(default=512, metadata={
        "help": "Expected Attention: future positions the RoPE rotation is averaged over"})
    n_sink: int = field(default=4, metadata={"help": "Expected Attention: first tokens kept and left out of the "
                                                    "statistics"})
    use_covariance: bool = field(default=True, metadata={"help": "Expected Attention: include the covariance term"})
    use_vnorm: bool = field(default=True, metadata={"help": "Expected Attention: weigh by the value norms"})
    epsilon: float = field(default=0.0, metadata={"help": "Expected Attention: added before the value-norm weight"})

    name: ClassVar[str] = "expected-attention"
    all_queries: ClassVar[bool] = True  # the statistics read every prompt query
    decodes: ClassVar[bool] = False

    def __post_init__(self) -> None:
        def integer(value, least: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        if not integer(self.n_future_positions, 1):
            raise ValueError(f"n_future_positions must be a positive integer, got {self.n_future_positions!r}")
        if not integer(self.n_sink, 0):
            raise ValueError(f"n_sink must be a non-negative integer, got {self.n_sink!r}")
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be finite and non-negative, got {self.epsilon!r}")

    # -- the pieces ------------------------------------------------------------------------------------------------
    def query_statistics(self, view: LayerView, stat: torch.Tensor, positions: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``(B, Hq, D)`` and biased covariance ``(B, Hq, D, D)`` (or None) of the pre-RoPE queries at ``stat``.

        The queries are un-rotated block by block (never a full float32 copy of them); the covariance is that of
        the centred queries (two passes), as numerically sound as the direct formula.
        """
        if view.rotary is None:
            raise TypeError("Expected Attention needs the model's rotary embedding (LayerView.rotary), and this "
                            "model defines none")
        rotary = view.rotary
        query = view.query
        batch, q_heads, seq, dim = query.shape
        count = stat.sum(-1).clamp_min(1).to(dtype)  # (B,)
        block = _block(batch, q_heads, dim, seq)

        def blocks():
            for start in range(0, seq, block):
                stop = min(seq, start + block)
                cos, sin = rotary(positions[:, start:stop])  # (P, n, R)
                q = unrotate(query[:, :, start:stop].to(dtype), cos[:, None].to(dtype), sin[:, None].to(dtype))
                yield q, stat[:, None, start:stop, None].to(dtype)

        total = query.new_zeros(batch, q_heads, dim, dtype=dtype)
        for q, weight in blocks():
            total += (q * weight).sum(dim=2)
        mean = total / count[:, None, None]
        if not self.use_covariance:
            return mean, None
        cov = query.new_zeros(batch, q_heads, dim, dim, dtype=dtype)
        for q, weight in blocks():
            centred = (q - mean[:, :, None]) * weight
            cov += torch.matmul(centred.transpose(-1, -2), centred)
        return mean, cov / count[:, None, None, None]

    def future_rotation(self, view: LayerView, next_position: torch.Tensor, dim: int, dtype) -> torch.Tensor:
        """``mean_t R_t`` ``(B, D, D)`` over ``t = next, ..., next + n_future_positions - 1`` per row."""
        assert view.rotary is not None
        steps = torch.arange(self.n_future_positions, device=next_position.device)
        cos, sin = view.rotary(next_position[:, None] + steps)
        return mean_rotation(cos.to(dtype), sin.to(dtype), dim)

    def expected_logits(self, keys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
        """``s mu'.k + (s^2/2) k^T Sigma' k`` ``(B, Hkv, G, S)`` for keys ``(B, Hkv, S, D)``, in key blocks."""
        batch, kv_heads, seq, dim = keys.shape
        groups = mean.shape[1] // kv_heads
        mean = mean.view(batch, kv_heads, groups, dim)
        k = keys.to(mean.dtype)
        logits = torch.matmul(mean, k.transpose(-1, -2)) * scaling  # (B, Hkv, G, S)
        if cov is None:
            return logits
        cov = cov.view(batch, kv_heads, groups, dim, dim)
        block = _block(batch, kv_heads * groups, dim, seq)
        quad = []
        for start in range(0, seq, block):
            kb = k[:, :, None, start:start + block]  # (B, Hkv, 1, n, D)
            quad.append((torch.matmul(kb, cov) * kb).sum(-1))  # (B, Hkv, G, n)
        return logits + torch.cat(quad, dim=-1) * (scaling * scaling / 2)

    # -- the scorer --------------------------------------------------------------------------------------------------
    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        keys = view.keys
        batch, kv_heads, seq, dim = keys.shape
        device = keys.device
        dtype = torch.promote_types(view.query.dtype, torch.float32)
        valid = (torch.ones(batch, seq, dtype=torch.bool, device=device) if view.key_valid is None
                 else view.key_valid.to(device))
        sink = valid & (valid.long().cumsum(-1) <= self.n_sink)
        stat = valid & ~sink  # queries of the statistics, keys of the softmax
        if view.positions is None:
            positions = torch.arange(seq, device=device)[None]
        else:
            positions = view.positions.to(device).long()
        next_position = positions.expand(batch, seq).masked_fill(~valid, -1).amax(-1) + 1  # (B,)

        mean, cov = self.query_statistics(view, stat, positions, dtype)
        rotation = self.future_rotation(view, next_position, dim, dtype)  # (B, D, D)
        mean = torch.matmul(mean, rotation.transpose(-1, -2))  # R mu, per query head
        if cov is not None:
            r = rotation[:, None]
            cov = torch.matmul(torch.matmul(r, cov), r.transpose(-1, -2))  # R Sigma R^T
        logits = self.expected_logits(keys, mean, cov, view.scaling)  # (B, Hkv, G, S)
        scored = stat[:, None, None, :]
        if not bool(torch.isfinite(logits).masked_fill(~scored, True).all()):
            raise NonFiniteAttentionError("expected attention logits contain NaN or inf")
        probs = torch.softmax(logits.masked_fill(~scored, float("-inf")), dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no scored key (prompt within the sinks)
        scores = probs.mean(dim=2)  # GQA mean, (B, Hkv, S)
        if self.use_vnorm:
            if view.values is None:
                raise TypeError("Expected Attention weighs by value norms and needs the values (LayerView.values)")
            norms = torch.linalg.vector_norm(view.values, dim=-1, dtype=dtype)
            scores = (scores + self.epsilon) * norms
        real = stat[:, None, :].expand_as(scores)
        top = scores[real].max() if bool(real.any()) else scores.new_zeros(())
        return torch.where(sink[:, None, :], top + 1, scores).float()

    def decode(self, view: DecodeView) -> torch.Tensor:
        raise NotImplementedError("Expected Attention scores at prefill only (decode_eviction must be False)")


@register("expected-attention", about="Expected Attention: attention expected from future queries x value norm",
          color="mediumseagreen")
class ExpectedAttention(Method):
    """Expected Attention (Devoto et al., 2025, arXiv 2510.00636), kvpress 0.5.5's defaults, uniform budgets.

    kvpress protects the ``n_sink`` first tokens and no window; kvcake always protects the last ``window`` tokens,
    and the default ``window = 1`` is the smallest protection the engine allows (the statistics use every prompt
    query, so no observation window is needed). Prefill-only: ``decode_eviction=True`` is refused. See
    :class:`ExpectedAttentionScores` for the parameters.
    """

    scorer_type = ExpectedAttentionScores
    default_window = 1


register_composition("cake-expected-attention", "CAKE's allocation with Expected Attention's scores (prefill-only)",
                     CAKE, scorer=ExpectedAttentionScores, decode_eviction=False, color="teal")

__all__ = ["ExpectedAttention", "ExpectedAttentionScores", "mean_rotation", "rotate_half", "unrotate"]
