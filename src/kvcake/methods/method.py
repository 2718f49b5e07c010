"""A method = a scorer + an allocator + a budget and options. Every named method is a subclass with defaults.

Composition is one argument: ``CAKE(budget=128, scorer=SnapKVScores())`` is CAKE's allocation with SnapKV's scores
(the paper's compatibility experiment), ``CAKE(budget=128, allocator=Uniform())`` CAKE's indicator with a uniform
split (the paper's ablation), and ``AdaKV(SnapKV(budget=128))`` head-wise allocation over any method.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from kvcake.methods.allocators import Uniform


@dataclass(frozen=True)
class Method:
    """Base of all eviction methods.

    Parameters
    ----------
    budget : int, optional
        Cache size per layer in tokens, window included: ``(budget - window) * layers`` evictable tokens are split
        across layers by the allocator.
    ratio : float, optional
        Instead of ``budget``: keep this fraction of each prompt's KV cache, in (0, 1].
    window : int
        The last ``window`` tokens are always kept (the observation window, or the recent window of H2O).
    cascade : bool
        Evict layer by layer during prefill (memory never exceeds the budget plus one layer); False allocates once
        after the last layer (identical final cache, full-cache peak).
    decode_eviction : bool
        Keep each layer at its budget while generating, dropping the lowest-scored non-window entry per step.
    scorer, allocator : optional
        Override the method's default scorer or allocator (composition).
    head_alpha : float, optional
        Ada-KV head-wise allocation: every KV head keeps at least ``head_alpha`` of the layer's per-head budget, the
        rest goes to the best scores of any head of the layer. None: all heads keep the same count.
    """

    budget: int | None = None
    ratio: float | None = None
    window: int = 32
    cascade: bool = True
    decode_eviction: bool = False
    scorer: Any = None
    allocator: Any = None
    head_alpha: float | None = None

    name: ClassVar[str] = "method"

    def __post_init__(self) -> None:
        if self.scorer is None:
            object.__setattr__(self, "scorer", self.default_scorer())
        if self.allocator is None:
            object.__setattr__(self, "allocator", self.default_allocator())
        if (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) or ratio (fraction of the prompt)")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int):
                raise TypeError(f"budget must be an integer number of tokens per layer, got {self.budget!r}")
            if self.budget <= 0:
                raise ValueError(f"budget must be a positive number of tokens per layer, got {self.budget}")
            if self.budget < self.window:
                raise ValueError(
                    f"budget ({self.budget} tokens per layer) is smaller than the window ({self.window}); the window "
                    "is always kept, so the budget must be at least the window"
                )
        if self.ratio is not None and not 0 < self.ratio <= 1:  # also rejects NaN
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.head_alpha is not None:
            if not (isinstance(self.head_alpha, (int, float)) and 0 <= self.head_alpha <= 1):
                raise ValueError(f"head_alpha must be in [0, 1], got {self.head_alpha}")
            if self.decode_eviction:
                raise ValueError("head-wise (Ada-KV) allocation evicts at prefill only; set decode_eviction=False")

    # -- defaults of the named method ------------------------------------------------------------------------------
    def default_scorer(self):
        raise TypeError("Method needs a scorer: pass scorer=... or use a named method such as CAKE or SnapKV")

    def default_allocator(self):
        return Uniform()

    # -- budget ------------------------------------------------------------------------------------------------------
    def total_budget(self, prompt_tokens: int, num_layers: int) -> int:
        """Evictable tokens for a prompt of ``prompt_tokens`` real tokens over ``num_layers`` layers (window excluded)."""
        if self.budget is not None:
            return (self.budget - self.window) * num_layers
        kept = round(self.ratio * prompt_tokens * num_layers)
        return max(0, kept - self.window * num_layers)

    # -- naming ------------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Name that says what was composed, e.g. ``ada-snapkv`` or ``cake[scorer=h2o]``."""
        parts = []
        default_scorer, default_allocator = self.default_scorer_or_none(), self.default_allocator()
        if default_scorer is None or type(self.scorer) is not type(default_scorer):
            parts.append(f"scorer={self.scorer.name}")
        if type(self.allocator) is not type(default_allocator):
            parts.append(f"allocator={self.allocator.name}")
        label = self.name + (f"[{','.join(parts)}]" if parts else "")
        return ("ada-" + label) if self.head_alpha is not None else label

    def default_scorer_or_none(self):
        try:
            return self.default_scorer()
        except TypeError:
            return None

    def with_options(self, **changes) -> Method:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def parameters(self) -> dict[str, Any]:
        """Plain parameters (for reports and JSON)."""
        out: dict[str, Any] = {"name": self.label}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("scorer", "allocator"):
                value = {"name": value.name, **{g.name: getattr(value, g.name) for g in fields(value)}}
            out[f.name] = value
        return out

