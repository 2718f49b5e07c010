"""The method layer: scoring and allocation, pure torch, no transformers imports."""

from kvcake.methods.allocation import allocate, head_counts, uniform
from kvcake.methods.allocators import Preference, Pyramid, Uniform
from kvcake.methods.baselines import H2O, TOVA, AdaKV, PyramidKV, SnapKV, StreamingLLM
from kvcake.methods.cake import CAKE, TAU_PRESETS, tau_preset
from kvcake.methods.method import Method
from kvcake.methods.scorers import CakeScores, H2OScores, SnapKVScores, StreamingScores, TOVAScores
from kvcake.methods.scoring import NonFiniteAttentionError, window_attention, window_statistics

__all__ = [
    "CAKE", "H2O", "TAU_PRESETS", "TOVA", "AdaKV", "CakeScores", "H2OScores", "Method", "NonFiniteAttentionError",
    "Preference", "Pyramid", "PyramidKV", "SnapKV", "SnapKVScores", "StreamingLLM", "StreamingScores", "TOVAScores",
    "Uniform", "allocate", "head_counts", "tau_preset", "uniform", "window_attention", "window_statistics",
]
