"""kvcake: CAKE KV-cache eviction for Hugging Face transformers.

Two lines around ``generate``::

    import kvcake
    with kvcake.compress(model, kvcake.CAKE(budget=256)) as press:
        out = model.generate(**inputs, max_new_tokens=64)
    print(press.report.summary())

Names are imported on first use, so ``import kvcake`` is instant and the command line answers ``--help`` and bad
arguments without loading torch or transformers. Every method registered in :mod:`kvcake.methods` (and its scorers and
allocators) is available here by name; submodules such as ``kvcake.models`` load on first access too.
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
    from kvcake.engines.transformers.cache import KVCakeCache, UnsupportedCacheError
    from kvcake.engines.transformers.report import Report
    from kvcake.engines.transformers.session import Compression, UnsupportedModelError, compress
    from kvcake.methods.adakv import AdaKV
    from kvcake.methods.allocation import allocate
    from kvcake.methods.attention import NonFiniteAttentionError
    from kvcake.methods.base import Allocator, Method, Scorer, Uniform
    from kvcake.methods.cake import CAKE, TAU_PRESETS, CakeScores, Preference, tau_preset
    from kvcake.methods.expected_attention import ExpectedAttention, ExpectedAttentionScores
    from kvcake.methods.h2o import H2O, H2OScores
    from kvcake.methods.knorm import KNorm, KNormScores
    from kvcake.methods.pyramidkv import Pyramid, PyramidKV
    from kvcake.methods.snapkv import SnapKV, SnapKVScores
    from kvcake.methods.streamingllm import StreamingLLM, StreamingScores
    from kvcake.methods.tova import TOVA, TOVAScores


def __getattr__(name: str) -> Any:
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


__all__ = [
    "CAKE", "H2O", "TAU_PRESETS", "TOVA", "AdaKV", "Allocator", "CakeScores", "Compression", "ExpectedAttention",
    "ExpectedAttentionScores", "H2OScores", "KNorm", "KNormScores", "KVCakeCache", "Method", "NonFiniteAttentionError",
    "Preference", "Pyramid", "PyramidKV", "Report", "Scorer", "SnapKV", "SnapKVScores", "StreamingLLM",
    "StreamingScores", "TOVAScores", "Uniform", "UnsupportedCacheError", "UnsupportedModelError", "allocate",
    "compress", "tau_preset",
]
