"""CAKE as a configuration: the scorer, the allocator and the options, validated.

Reference: Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", ICLR 2025
(arXiv 2503.12491). Defaults are the paper's: observation window S_w = 32, pooling kernel 5, gamma = 200,
tau1 = tau2 = 1 unless a published preset applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kvcake.methods.allocation import allocate
from kvcake.methods.scoring import cake_statistics, layer_preference

#: The authors' published temperatures (tau1, tau2) per model at 128 and 1024 tokens per layer.
TAU_PRESETS: dict[str, dict[int, tuple[float, float]]] = {
    "llama-3.1-8b-instruct": {128: (1.6, 0.6), 1024: (1.6, 0.4)},
    "llama-2-7b-chat": {128: (0.9, 2.3), 1024: (1.9, 1.8)},
    "llama-2-13b-chat": {128: (1.8, 2.0), 1024: (0.5, 0.4)},
    "mistral-7b-instruct-v0.3": {128: (1.0, 0.8), 1024: (0.8, 0.5)},
    "qwen2.5-7b-instruct": {128: (0.4, 0.6), 1024: (1.5, 0.6)},
}


def tau_preset(model: str, budget: int) -> tuple[float, float]:
    """Published (tau1, tau2) for ``model`` at the published budget (128 or 1024) nearest to ``budget``.

    The authors tuned tau only at 128 and 1024 tokens per layer; for other budgets we take the nearer of the two on a
    log scale (our choice, documented in docs/method.md).
    """
    key = model.lower().split("/")[-1]
    if key not in TAU_PRESETS:
        raise KeyError(f"no published tau for {model!r}; known presets: {', '.join(sorted(TAU_PRESETS))}")
    table = TAU_PRESETS[key]
    nearest = min(table, key=lambda b: abs(math.log(b) - math.log(max(budget, 1))))
    return table[nearest]


@dataclass(frozen=True)
class CAKE:
    """Cascading and Adaptive KV cache Eviction.

    Parameters
    ----------
    budget : int, optional
        Cache size per layer in tokens, window included (the paper's "cache size"). The global evictable budget is
        ``(budget - window) * num_layers``, split across layers by preference.
    ratio : float, optional
        Alternative to ``budget``: keep this fraction of each prompt's KV cache, in (0, 1].
    window : int
        Observation window S_w: the last ``window`` prompt tokens are always kept and their queries score the rest.
    kernel : int
        Average-pooling kernel along keys (odd).
    gamma : float
        Weight of the variance term in the indicator mean + gamma * var.
    tau1, tau2 : float
        Temperatures of the layer preference P = H^(1/tau1) * V^(1/tau2).
    cascade : bool
        True: cascading memory management during prefill (default; memory never exceeds the budget plus one layer).
        False: one-shot allocation after the last layer (same final cache, full-cache peak).
    decode_eviction : bool
        True: keep each layer at its budget while generating, dropping the lowest-scored non-window token per step
        (the authors' decoding). False: evict during prefill only; the cache grows while generating.
    """

    budget: int | None = None
    ratio: float | None = None
    window: int = 32
    kernel: int = 5
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0
    cascade: bool = True
    decode_eviction: bool = True

    name = "cake"

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) or ratio (fraction of the prompt)")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise TypeError(f"budget must be an integer number of tokens per layer, got {self.budget!r}")
            if self.budget <= 0:
                raise ValueError(f"budget must be a positive number of tokens per layer, got {self.budget}")
            if self.budget < self.window:
                raise ValueError(
                    f"budget ({self.budget} tokens per layer) is smaller than the observation window ({self.window}); "
                    "the window is always kept, so the budget must be at least the window"
                )
        if self.ratio is not None and not 0 < self.ratio <= 1:  # also rejects NaN
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer, got {self.kernel!r}")
        if not math.isfinite(self.gamma) or self.gamma < 0:
            raise ValueError(f"gamma must be finite and non-negative, got {self.gamma}")
        for name in ("tau1", "tau2"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be finite and positive, got {value}")

    @classmethod
    def from_preset(cls, model: str, budget: int, **kwargs) -> CAKE:
        """CAKE with the authors' published temperatures for ``model`` (see :data:`TAU_PRESETS`)."""
        tau1, tau2 = tau_preset(model, budget)
        return cls(budget=budget, tau1=tau1, tau2=tau2, **kwargs)

    def with_options(self, **changes) -> CAKE:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- budget ----------------------------------------------------------------------------------------------------
    def total_budget(self, prompt_tokens: int, num_layers: int) -> int:
        """Evictable tokens for a prompt of ``prompt_tokens`` real tokens over ``num_layers`` layers (window excluded)."""
        if self.budget is not None:
            return (self.budget - self.window) * num_layers
        kept = round(self.ratio * prompt_tokens * num_layers)
        return max(0, kept - self.window * num_layers)

    # -- scoring and allocation -----------------------------------------------------------------------------------
    def layer_scores(self, attn: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer preference ``(B,)`` float64 and indicator ``(B, Hkv, S - W)`` from window attention."""
        stats = cake_statistics(attn, kv_heads, self.gamma, self.kernel)
        return layer_preference(stats.entropy, stats.variance, self.tau1, self.tau2), stats.indicator

    def allocate(self, preferences: list[float], total: int, cap: int) -> list[int]:
        """Per-layer evictable budgets (see :func:`kvcake.methods.allocation.allocate`)."""
        return allocate(preferences, total, cap)
