"""The methods CAKE is compared with, as scorer + allocator pairs with each paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvcake.methods.allocators import Pyramid, Uniform
from kvcake.methods.method import Method
from kvcake.methods.scorers import H2OScores, SnapKVScores, StreamingScores, TOVAScores


@dataclass(frozen=True)
class SnapKV(Method):
    """SnapKV (Li et al., 2024, arXiv 2404.14469): window attention, pooled, the same budget for every layer.

    Defaults: window 32, kernel 7, max pooling; prefill-only eviction.
    """

    kernel: int = 7
    pooling: str = "max"

    name = "snapkv"

    def default_scorer(self):
        return SnapKVScores(kernel=self.kernel, pooling=self.pooling)

    def __post_init__(self) -> None:
        SnapKVScores(kernel=self.kernel, pooling=self.pooling)
        super().__post_init__()


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV's scores with budgets shrinking from bottom to top.

    Default beta = 20: the top layer gets 1/20 of the mean per-layer budget, the bottom layer the rest of twice it.
    """

    beta: float = 20.0

    name = "pyramidkv"

    def default_allocator(self):
        return Pyramid(beta=self.beta)

    def __post_init__(self) -> None:
        Pyramid(beta=self.beta)
        super().__post_init__()


@dataclass(frozen=True)
class H2O(Method):
    """H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent tokens.

    The accumulation covers every prompt query (computed in blocks) and continues while decoding, with one eviction
    per layer per step. ``window`` is the recent part; by default half the budget (the paper's 50/50 split), or 32
    with a ratio budget.
    """

    window: int = 0
    decode_eviction: bool = True

    name = "h2o"

    def __post_init__(self) -> None:
        if self.window == 0:
            object.__setattr__(self, "window", max(1, self.budget // 2) if isinstance(self.budget, int) else 32)
        super().__post_init__()

    def default_scorer(self):
        return H2OScores()


@dataclass(frozen=True)
class TOVA(Method):
    """TOVA (Oren et al., 2024, arXiv 2401.06104): evict by the newest token's head-averaged attention, at prefill
    and at every decoding step. Only the newest token is protected (window 1)."""

    window: int = 1
    decode_eviction: bool = True

    name = "tova"

    def default_scorer(self):
        return TOVAScores()


@dataclass(frozen=True)
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): ``sinks`` first tokens + the most recent ones.

    Default 4 sinks; the rest of the budget is the recent window, kept sliding while decoding.
    """

    sinks: int = 4
    window: int = 1
    decode_eviction: bool = True

    name = "streamingllm"

    def default_scorer(self):
        return StreamingScores(sinks=self.sinks)

    def __post_init__(self) -> None:
        StreamingScores(sinks=self.sinks)
        if isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget <= self.sinks:
            raise ValueError(f"budget ({self.budget}) must exceed the number of sinks ({self.sinks})")
        super().__post_init__()


def AdaKV(method: Method, alpha: float = 0.2) -> Method:  # noqa: N802 (reads as a method name)
    """Ada-KV (Feng et al., 2024, arXiv 2407.11550) head-wise allocation over any method's scores and layer split.

    Each KV head keeps at least ``alpha`` of the layer's per-head budget (the paper's safeguard, default 0.2); the
    rest of the layer's budget goes to the best scores of any head. Heads then hold different numbers of tokens:
    the layer is stored padded to its longest head (masked filler slots, counted in the reported memory).
    """
    return replace(method, head_alpha=alpha, decode_eviction=False)


__all__ = ["AdaKV", "H2O", "PyramidKV", "SnapKV", "StreamingLLM", "TOVA", "Uniform"]
