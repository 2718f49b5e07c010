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
from kvcake.methods import CAKE, TAU_PRESETS, NonFiniteAttentionError, allocate, tau_preset

__version__ = "0.1.0"

__all__ = ["CAKE", "Compression", "KVCakeCache", "NonFiniteAttentionError", "Report", "TAU_PRESETS",
           "UnsupportedModelError", "allocate", "compress", "tau_preset"]
