"""kvcake: CAKE KV-cache eviction for Hugging Face transformers.

Two lines around ``generate``::

    import kvcake
    with kvcake.compress(model, kvcake.CAKE(budget=256)) as press:
        out = model.generate(**inputs, max_new_tokens=64)
    print(press.report.summary())

Names are imported on first use, so ``import kvcake`` is instant and the command line answers ``--help`` and bad
arguments without loading torch or transformers. Every method registered in :mod:`kvcake.methods` (and its scorers and
allocators) is available here by name; submodules such as ``kvcake.models`` load on first access too.

``__all__`` is derived, not written: the names of ``_HOMES`` and every name a method module exports
(:data:`kvcake.methods.METHOD_EXPORTS`), so a new method file is public here with no edit. Static type checkers and
IDEs read the ``TYPE_CHECKING`` imports below instead (``import X as X`` re-exports ``X``); ``tests/test_exports.py``
fails when they miss a public name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names that do not come from the method registry, and the module holding each.
_HOMES = {
    "Compression": "kvcake.engines.transformers.session",
    "UnsupportedModelError": "kvcake.engines.transformers.session",
    "compress": "kvcake.engines.transformers.session",
    "KVCakeCache": "kvcake.engines.transformers.cache",
    "UnsupportedCacheError": "kvcake.engines.transformers.cache",
    "Report": "kvcake.engines.transformers.report",
    "NonFiniteAttentionError": "kvcake.methods.attention",
    "allocate": "kvcake.methods.allocation",
    "Method": "kvcake.methods.base",
    "Scorer": "kvcake.methods.base",
    "Allocator": "kvcake.methods.base",
    "Uniform": "kvcake.methods.base",
}
_SUBMODULES = {"bench", "cli", "engines", "eval", "methods", "models", "needle", "pipeline", "plots"}

if TYPE_CHECKING:  # what static type checkers see; at run time the same names load lazily
    from kvcake.engines.transformers.cache import KVCakeCache as KVCakeCache
    from kvcake.engines.transformers.cache import UnsupportedCacheError as UnsupportedCacheError
    from kvcake.engines.transformers.report import Report as Report
    from kvcake.engines.transformers.session import Compression as Compression
    from kvcake.engines.transformers.session import UnsupportedModelError as UnsupportedModelError
    from kvcake.engines.transformers.session import compress as compress
    from kvcake.methods.adakv import AdaKV as AdaKV
    from kvcake.methods.allocation import allocate as allocate
    from kvcake.methods.attention import NonFiniteAttentionError as NonFiniteAttentionError
    from kvcake.methods.base import Allocator as Allocator
    from kvcake.methods.base import Method as Method
    from kvcake.methods.base import Scorer as Scorer
    from kvcake.methods.base import Uniform as Uniform
    from kvcake.methods.cake import CAKE as CAKE
    from kvcake.methods.cake import TAU_PRESETS as TAU_PRESETS
    from kvcake.methods.cake import CakeScores as CakeScores
    from kvcake.methods.cake import Preference as Preference
    from kvcake.methods.cake import WindowStatistics as WindowStatistics
    from kvcake.methods.cake import layer_preference as layer_preference
    from kvcake.methods.cake import tau_preset as tau_preset
    from kvcake.methods.cake import window_statistics as window_statistics
    from kvcake.methods.decoding import lowest_candidate as lowest_candidate
    from kvcake.methods.decoding import select_drops as select_drops
    from kvcake.methods.expected_attention import ExpectedAttention as ExpectedAttention
    from kvcake.methods.expected_attention import ExpectedAttentionScores as ExpectedAttentionScores
    from kvcake.methods.expected_attention import mean_rotation as mean_rotation
    from kvcake.methods.expected_attention import rotate_half as rotate_half
    from kvcake.methods.expected_attention import unrotate as unrotate
    from kvcake.methods.h2o import H2O as H2O
    from kvcake.methods.h2o import H2OScores as H2OScores
    from kvcake.methods.knorm import KNorm as KNorm
    from kvcake.methods.knorm import KNormScores as KNormScores
    from kvcake.methods.knorm import key_norm_scores as key_norm_scores
    from kvcake.methods.pyramidkv import Pyramid as Pyramid
    from kvcake.methods.pyramidkv import PyramidKV as PyramidKV
    from kvcake.methods.snapkv import SnapKV as SnapKV
    from kvcake.methods.snapkv import SnapKVScores as SnapKVScores
    from kvcake.methods.streamingllm import StreamingLLM as StreamingLLM
    from kvcake.methods.streamingllm import StreamingScores as StreamingScores
    from kvcake.methods.tova import TOVA as TOVA
    from kvcake.methods.tova import TOVAScores as TOVAScores


def public_names() -> list[str]:
    """``kvcake.__all__``: the names of ``_HOMES`` and every name a method module exports."""
    methods = importlib.import_module("kvcake.methods")
    return sorted({*_HOMES, *methods.METHOD_EXPORTS})


def __getattr__(name: str) -> Any:
    if name == "__all__":  # derived on first use (``from kvcake import *``, help(), IDEs at run time)
        return public_names()
    if name in _SUBMODULES:
        return importlib.import_module(f"kvcake.{name}")
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        methods = importlib.import_module("kvcake.methods")
        if name.startswith("_") or name not in methods.__all__:
            raise AttributeError(f"module 'kvcake' has no attribute {name!r}")
        value = getattr(methods, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    methods = importlib.import_module("kvcake.methods")
    return sorted({*globals(), *_HOMES, *_SUBMODULES, *methods.__all__})
