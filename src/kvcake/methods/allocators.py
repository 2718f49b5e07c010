"""Allocators: how one global budget is split across layers (and, with Ada-KV, across the heads of a layer).

An allocator may compute a per-layer preference from the layer's prefill (CAKE does); the split itself is always the
exact, capped divisor method of :mod:`kvcake.methods.allocation`, so every allocator sums to the budget exactly and,
in the cascade, never grows a layer's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcake.methods.allocation import allocate
from kvcake.methods.scoring import layer_preference
from kvcake.methods.view import LayerView


@dataclass(frozen=True)
class Uniform:
    """The same budget for every layer (SnapKV, H2O, TOVA, StreamingLLM; CAKE's "uniform" ablation)."""

    name = "uniform"

    def preference(self, view: LayerView, window: int) -> torch.Tensor | None:
        return None

    def split(self, preferences: list[float], total: int, cap: int, num_layers: int) -> list[int]:
        return allocate([1.0] * num_layers, total, cap)[: len(preferences)]


@dataclass(frozen=True)
class Pyramid:
    """PyramidKV (Cai et al., 2024, arXiv 2406.02069): budgets shrinking linearly from the bottom layer up.

    With per-layer mean budget m, the top layer gets m/beta and the bottom layer 2m - m/beta, in arithmetic
    progression; the split is then made exact and capped by the divisor method. Default beta = 20 (the paper's).
    """

    beta: float = 20.0
    name = "pyramid"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 1):
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def preference(self, view: LayerView, window: int) -> torch.Tensor | None:
        return None

    def weights(self, num_layers: int) -> list[float]:
        if num_layers == 1:
            return [1.0]
        low = 1.0 / self.beta
        high = 2.0 - low
        step = (high - low) / (num_layers - 1)
        return [high - i * step for i in range(num_layers)]

    def split(self, preferences: list[float], total: int, cap: int, num_layers: int) -> list[int]:
        return allocate(self.weights(num_layers), total, cap)[: len(preferences)]


@dataclass(frozen=True)
class Preference:
    """CAKE's layer preference P = H^(1/tau1) * V^(1/tau2) of window attention (CAKE §3.1-3.2)."""

    tau1: float = 1.0
    tau2: float = 1.0
    name = "preference"

    def __post_init__(self) -> None:
        for field_name in ("tau1", "tau2"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field_name} must be finite and positive, got {value}")

    def preference(self, view: LayerView, window: int) -> torch.Tensor:
        stats = view.window_statistics(window)
        return layer_preference(stats.entropy, stats.variance, self.tau1, self.tau2)

    def split(self, preferences: list[float], total: int, cap: int, num_layers: int) -> list[int]:
        return allocate(preferences, total, cap)
