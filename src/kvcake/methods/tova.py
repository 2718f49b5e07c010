"""TOVA (Oren et al., 2024, arXiv 2401.06104): evict by the newest token's attention, averaged over all heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvcake.methods.base import Method, Scorer
from kvcake.methods.registry import register

if TYPE_CHECKING:
    import torch

    from kvcake.methods.views import DecodeView, LayerView


@dataclass(frozen=True)
class TOVAScores(Scorer):
    """The last token's attention averaged over all heads: every head of a layer keeps the same tokens; at each
    decoding step the lowest-scored entry is dropped."""

    name: ClassVar[str] = "tova"
    decode_from_probs: ClassVar[bool] = True

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        last = view.window_attention(1)[:, :, -1]  # (B, Hq, S)
        return last.mean(dim=1, keepdim=True).expand(-1, view.kv_heads, -1).contiguous()

    def decode(self, view: DecodeView) -> torch.Tensor:
        return view.attention().mean(dim=1, keepdim=True).expand(-1, view.kv_heads, -1).contiguous()


@register("tova", about="TOVA: newest token's head-averaged attention, every step", color="tab:purple")
class TOVA(Method):
    """TOVA at prefill and at every decoding step. Only the newest token is protected (window 1)."""

    scorer_type = TOVAScores
    default_window = 1
    default_decode_eviction = True


__all__ = ["TOVA", "TOVAScores"]
