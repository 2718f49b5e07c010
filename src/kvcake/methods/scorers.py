"""Token scorers: which entries of a layer matter, per KV head. Higher is kept.

A scorer gives raw scores for every prompt position at the end of a layer's prefill and, for decode-time eviction,
for every stored entry at each step. The engine then protects the observation window (+inf) and padding (-inf).
Each scorer cites the paper it implements; defaults are the paper's settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcake.methods.scoring import group_mean, last_query_attention, pool_scores
from kvcake.methods.view import LayerView

INF = float("inf")


@dataclass(frozen=True)
class DecodeView:
    """One layer at a decoding step, after the new entries were appended.

    ``allowed`` ``(B, Hkv, q, L)`` is the layer's mask; ``positions`` ``(B, Hkv, L)`` the original positions (-1 for
    filler slots); ``stored`` the scores kept beside the entries by scorers that keep them (new entries start at 0).
    """

    query: torch.Tensor
    keys: torch.Tensor
    scaling: float
    softcap: float | None
    allowed: torch.Tensor | None
    positions: torch.Tensor
    stored: torch.Tensor | None
    probs: torch.Tensor | None = None

    def attention(self) -> torch.Tensor:
        """Attention ``(B, Hq, L)`` of the newest query over the stored entries (given, or computed here)."""
        if self.probs is not None:
            return self.probs
        return last_query_attention(self.query, self.keys, self.scaling, self.allowed, self.softcap)


def _pool(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    if pooling == "max" and kernel > 1 and scores.shape[-1] > 0:
        if scores.dim() == 3:
            return torch.nn.functional.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)
        shape = scores.shape
        flat = scores.reshape(-1, 1, shape[-1])
        return torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(shape)
    return pool_scores(scores, kernel)


def _with_window(scores: torch.Tensor, seq: int) -> torch.Tensor:
    """Pad non-window scores ``(B, H, N)`` to ``seq`` positions with +inf for the window."""
    batch, heads, n = scores.shape
    return torch.cat([scores, scores.new_full((batch, heads, seq - n), INF)], dim=-1)


def _check_kernel(kernel: int) -> None:
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd integer, got {kernel!r}")


@dataclass(frozen=True)
class CakeScores:
    """CAKE's indicator mean + gamma * var of window attention, average-pooled, GQA-averaged (CAKE §3.3).

    At decode time: the current query's attention, pooled and GQA-averaged (CAKE §3.4).
    """

    gamma: float = 200.0
    kernel: int = 5
    name = "cake"
    keeps_scores = False
    all_queries = False

    def __post_init__(self) -> None:
        _check_kernel(self.kernel)
        if not (self.gamma >= 0 and self.gamma != INF):
            raise ValueError(f"gamma must be finite and non-negative, got {self.gamma}")

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        indicator = view.window_statistics(window).indicator(self.gamma, self.kernel, view.kv_heads)
        return _with_window(indicator, view.seq)

    def decode(self, ctx: DecodeView) -> torch.Tensor:
        # Average pooling and the group mean are both linear: averaging the group first pools G times fewer rows.
        return pool_scores(group_mean(ctx.attention(), ctx.keys.shape[1]), self.kernel)


@dataclass(frozen=True)
class SnapKVScores:
    """SnapKV (Li et al., 2024, arXiv 2404.14469): mean window attention per key, pooled, GQA-averaged.

    Defaults: kernel 7 with max pooling. SnapKV defines no decode-time policy; if asked to evict while decoding we
    score by the current query's pooled attention.
    """

    kernel: int = 7
    pooling: str = "max"
    name = "snapkv"
    keeps_scores = False
    all_queries = False

    def __post_init__(self) -> None:
        _check_kernel(self.kernel)
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        attn = view.window_attention(window)
        past = attn[..., : attn.shape[-1] - attn.shape[-2]].mean(dim=2)
        return _with_window(group_mean(_pool(past, self.kernel, self.pooling), view.kv_heads), view.seq)

    def decode(self, ctx: DecodeView) -> torch.Tensor:
        return group_mean(_pool(ctx.attention(), self.kernel, self.pooling), ctx.keys.shape[1])


@dataclass(frozen=True)
class H2OScores:
    """H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): attention accumulated over every query seen.

    Prefill sums the causal attention of all prompt queries per key (computed in blocks, never the S x S matrix);
    each decoding step adds the new query's attention to the stored sums, and the lowest sum outside the recent
    window is evicted. GQA groups are averaged.
    """

    name = "h2o"
    keeps_scores = True
    all_queries = True  # prefill reads every prompt query, not only the window's

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        return group_mean(view.accumulated_attention(), view.kv_heads)

    def decode(self, ctx: DecodeView) -> torch.Tensor:
        return ctx.stored + group_mean(ctx.attention(), ctx.keys.shape[1])


@dataclass(frozen=True)
class TOVAScores:
    """TOVA (Oren et al., 2024, arXiv 2401.06104): the last token's attention averaged over all heads.

    Every head of a layer keeps the same tokens; at each decoding step the lowest-scored entry is dropped.
    """

    name = "tova"
    keeps_scores = False
    all_queries = False

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        last = view.window_attention(1)[:, :, -1]  # (B, Hq, S)
        return last.mean(dim=1, keepdim=True).expand(-1, view.kv_heads, -1).contiguous()

    def decode(self, ctx: DecodeView) -> torch.Tensor:
        return ctx.attention().mean(dim=1, keepdim=True).expand(-1, ctx.keys.shape[1], -1).contiguous()


@dataclass(frozen=True)
class StreamingScores:
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks plus the most recent tokens.

    The first ``sinks`` real tokens of each row score +inf, every other token its position, so eviction keeps the
    sinks and the newest tokens; at decode time the oldest non-sink entry goes.
    """

    sinks: int = 4
    name = "streamingllm"
    keeps_scores = True
    all_queries = False

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {self.sinks!r}")

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        batch, seq = view.keys.shape[0], view.seq
        device = view.keys.device
        if view.key_valid is None:
            real = torch.arange(seq, device=device).expand(batch, seq)
        else:
            real = view.key_valid.to(device).long().cumsum(-1) - 1
        scores = torch.where(real < self.sinks, INF, torch.arange(seq, device=device, dtype=torch.float32))
        return scores[:, None, :].expand(-1, view.kv_heads, -1).float().contiguous()

    def decode(self, ctx: DecodeView) -> torch.Tensor:
        return torch.where(ctx.stored == INF, INF, ctx.positions.float())
