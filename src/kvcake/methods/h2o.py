"""H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): heavy hitters by accumulated attention, plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvcake.methods.attention import group_mean
from kvcake.methods.base import Method, Scorer
from kvcake.methods.registry import register

if TYPE_CHECKING:
    import torch

    from kvcake.methods.views import DecodeView, LayerView


@dataclass(frozen=True)
class H2OScores(Scorer):
    """Attention accumulated over every query seen.

    Prefill sums the causal attention of all prompt queries per key (computed in blocks, never the S x S matrix);
    each decoding step adds the new query's attention to the stored sums, and the lowest sum outside the recent
    window is evicted. GQA groups are averaged.
    """

    name: ClassVar[str] = "h2o"
    keeps_scores: ClassVar[bool] = True
    all_queries: ClassVar[bool] = True  # prefill reads every prompt query, not only the window's

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        return group_mean(view.accumulated_attention(), view.kv_heads)

    def decode(self, view: DecodeView) -> torch.Tensor:
        assert view.stored is not None, "H2O's decode scores add to the stored sums"
        return view.stored + group_mean(view.attention(), view.kv_heads)


@register("h2o", about="H2O: accumulated attention + recent window, decode-time eviction", color="tab:green")
class H2O(Method):
    """H2O with one eviction per layer per step while decoding. ``window`` is the recent part: by default half the
    budget (the paper's 50/50 split), or 32 with a ratio budget."""

    scorer_type = H2OScores
    default_decode_eviction = True

    @classmethod
    def window_for(cls, budget: int | None) -> int:
        return max(1, budget // 2) if isinstance(budget, int) and not isinstance(budget, bool) else 32

    @classmethod
    def describe_window(cls) -> str:
        return "half the budget (32 with a ratio)"


__all__ = ["H2O", "H2OScores"]
