"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV's scores with budgets shrinking from the bottom layer up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from kvcake.methods.base import Allocator
from kvcake.methods.registry import register
from kvcake.methods.snapkv import SnapKV


@dataclass(frozen=True)
class Pyramid(Allocator):
    """Budgets in arithmetic progression: with per-layer mean m, the top layer gets m/beta and the bottom layer
    2m - m/beta; the split is then made exact and capped by the divisor method. Default beta = 20 (the paper's)."""

    beta: float = field(default=20.0, metadata={"help": "PyramidKV: the top layer gets 1/beta of the mean budget"})

    name: ClassVar[str] = "pyramid"

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 1):
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def weights(self, num_layers: int) -> list[float]:
        if num_layers == 1:
            return [1.0]
        low = 1.0 / self.beta
        high = 2.0 - low
        step = (high - low) / (num_layers - 1)
        return [high - i * step for i in range(num_layers)]


@register("pyramidkv", about="PyramidKV: SnapKV scores, pyramid budgets", color="tab:orange")
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV's scorer (window 32, kernel 7, max pooling) under the :class:`Pyramid` split."""

    allocator_type = Pyramid


__all__ = ["Pyramid", "PyramidKV"]
