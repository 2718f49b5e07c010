"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kvcake._lazy import torch
from kvcake.methods.base import Method, Scorer
from kvcake.methods.registry import register

if TYPE_CHECKING:
    from kvcake.methods.views import DecodeView, LayerView

INF = float("inf")


@dataclass(frozen=True)
class StreamingScores(Scorer):
    """The first ``sinks`` real tokens of each row score +inf, every other token its position, so eviction keeps the
    sinks and the newest tokens; at decode time the oldest non-sink entry goes."""

    sinks: int = field(default=4, metadata={"help": "StreamingLLM: attention sinks kept"})

    name: ClassVar[str] = "streamingllm"
    keeps_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
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

    def decode(self, view: DecodeView) -> torch.Tensor:
        assert view.stored is not None and view.positions is not None
        return torch.where(view.stored == INF, INF, view.positions.float())


@register("streamingllm", about="StreamingLLM: attention sinks + recent window", color="tab:brown")
class StreamingLLM(Method):
    """StreamingLLM: 4 sinks by default; the rest of the budget is the recent window, kept sliding while decoding."""

    scorer_type = StreamingScores
    default_window = 1
    default_decode_eviction = True

    def validate(self) -> None:
        sinks = self.scorer.sinks if isinstance(self.scorer, StreamingScores) else 0
        if isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget <= sinks:
            raise ValueError(f"budget ({self.budget}) must exceed the number of sinks ({sinks})")
        super().validate()


__all__ = ["StreamingLLM", "StreamingScores"]
