"""The method layer: scoring and allocation, pure torch, no transformers imports."""

from kvcake.methods.allocation import allocate, uniform
from kvcake.methods.cake import CAKE, TAU_PRESETS, tau_preset
from kvcake.methods.scoring import NonFiniteAttentionError, cake_statistics, window_attention

__all__ = ["CAKE", "TAU_PRESETS", "NonFiniteAttentionError", "allocate", "cake_statistics", "tau_preset", "uniform",
           "window_attention"]
