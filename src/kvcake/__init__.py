"""kvcake: CAKE KV-cache eviction for Hugging Face transformers.

Two lines around ``generate``::

    import kvcake
    with kvcake.compress(model, kvcake.CAKE(budget=256)) as press:
        out = model.generate(**inputs, max_new_tokens=64)
    print(press.report.summary())
"""

from kvcake.integration.cache import KVCakeCache
from kvcake.integration.report import Report
from kvcake.integration.session import Compression, UnsupportedModelError, compress
from kvcake.methods import (
    CAKE, H2O, TAU_PRESETS, TOVA, AdaKV, CakeScores, H2OScores, Method, NonFiniteAttentionError, Preference, Pyramid,
    PyramidKV, SnapKV, SnapKVScores, StreamingLLM, StreamingScores, TOVAScores, Uniform, allocate, tau_preset,
)

__version__ = "0.1.0"

__all__ = [
    "CAKE", "H2O", "TAU_PRESETS", "TOVA", "AdaKV", "CakeScores", "Compression", "H2OScores", "KVCakeCache", "Method",
    "NonFiniteAttentionError", "Preference", "Pyramid", "PyramidKV", "Report", "SnapKV", "SnapKVScores",
    "StreamingLLM", "StreamingScores", "TOVAScores", "Uniform", "UnsupportedModelError", "allocate", "compress",
    "tau_preset",
]
