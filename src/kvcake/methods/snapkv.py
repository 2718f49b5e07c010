"""SnapKV (Li et al., 2024, arXiv 2404.14469): the attention of an observation window of prompt queries, pooled,
decides which earlier tokens each KV head keeps; every layer gets the same budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kvcake.methods.attention import check_kernel, group_mean, pool_scores
from kvcake.methods.base import Method, Scorer
from kvcake.methods.registry import register

if TYPE_CHECKING:
    import torch

    from kvcake.methods.views import DecodeView, LayerView


@dataclass(frozen=True)
class SnapKVScores(Scorer):
    """Mean window attention per key, pooled along keys, GQA-averaged.

    Defaults: kernel 7 with max pooling (the paper's). SnapKV defines no decode-time policy; if asked to evict while
    decoding we score by the current query's pooled attention.
    """

    kernel: int = field(default=7, metadata={"help": "pooling kernel along keys (odd)"})
    pooling: str = field(default="max", metadata={"help": "SnapKV: pooling of the window attention, max or avg"})

    name: ClassVar[str] = "snapkv"
    decode_from_probs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_kernel(self.kernel)
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        attn = view.window_attention(window)
        past = attn[..., : attn.shape[-1] - attn.shape[-2]].mean(dim=2)
        return view.with_window(group_mean(pool_scores(past, self.kernel, self.pooling), view.kv_heads))

    def decode(self, view: DecodeView) -> torch.Tensor:
        return group_mean(pool_scores(view.attention(), self.kernel, self.pooling), view.kv_heads)


@register("snapkv", about="SnapKV: pooled window attention, uniform budgets", color="tab:blue")
class SnapKV(Method):
    """SnapKV: window 32, kernel 7, max pooling, the same budget for every layer; prefill-only eviction."""

    scorer_type = SnapKVScores


__all__ = ["SnapKV", "SnapKVScores"]
