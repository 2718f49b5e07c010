"""The method layer: scorers, allocators and the budget policy, pure torch, no transformers imports.

Every module of this package is imported here, so each method file registers itself (see
:mod:`kvcake.methods.registry`) and its public names are exported from ``kvcake.methods`` (and ``kvcake``): a new
method is one new file. torch is imported on first use only (:mod:`kvcake._lazy`), so the command line can read the
methods and check arguments without it.

The contract with an engine
---------------------------
Two engines run these methods, :mod:`kvcake.engines.transformers` and :mod:`kvcake.engines.vllm`; both follow
this contract, which is all an engine needs to know, and both keep the same entries for the same method, budget and
prompt. For one request (``B`` rows, each budgeted as if it ran alone) over its ``L`` compressed layers:

1. **Budget.** ``RequestBudget(method, L, prompt_tokens_per_row, padded_length)`` holds the request's budgets.
2. **Each layer at the end of its prefill.** The engine builds a :class:`LayerView`: post-RoPE ``query``
   ``(B, Hq, S, D)`` (every prompt query if ``method.scorer.all_queries``, else at least the last ``window``),
   post-RoPE ``keys`` and ``values`` ``(B, Hkv, S, D)`` per KV head (never repeated to query heads), the layer's
   ``scaling`` and ``softcap``, ``key_valid`` (False on padding), the layer's index among the compressed layers and
   their number. It asks ``method.allocator.preference(view, window)`` (``(B,)``, or None for fixed weights) and
   ``method.scorer.prefill(view, window)`` (scores ``(B, Hkv, S)``, higher is kept), protects the last ``window``
   positions with +inf (padding with -inf), and hands the preference to ``budget.push(preference, device)``.
3. **Eviction.** When ``push`` returns True (after every layer in the cascade, after the last one otherwise),
   ``budget.set_shares(budget.device_shares().tolist())`` fixes the seen layers' shares; each seen layer keeps
   everything if ``budget.keeps_everything(layer)``, else its ``budget.keep_counts(layer, ranked)`` highest-ranked
   entries per KV head, ties to the earlier position (a stable descending sort), in position order. Shares never
   grow from stage to stage, so applying only the last stage keeps the same entries (one-shot = cascade). After the
   last layer, ``budget.finish_device()``.
4. **Decoding** (when ``method.decode_eviction``). After a new token is stored, a layer may hold
   ``budget.decode_targets(logical_length)[row][layer]`` entries; the engine builds a :class:`DecodeView` in
   position order (the new query, each entry's position, the entries' attention if it computed it, the stored
   scores if ``scorer.keeps_scores``), asks ``method.scorer.decode(view)`` for scores ``(B, Hkv, L)`` (stored back if
   ``keeps_scores``) and drops what :func:`kvcake.methods.decoding.select_drops` says (never the last ``window``).

The engines test it once each: ``tests/test_engine.py`` (kept = top-scored, budgets sum exactly, cascade = one-shot)
and ``tests/test_vllm_engine.py`` (vLLM's tokens equal the transformers engine's for the same method and budget).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from kvcake.methods.allocation import allocate, head_counts, uniform
from kvcake.methods.attention import NonFiniteAttentionError, window_attention
from kvcake.methods.base import Allocator, Method, Scorer, Uniform
from kvcake.methods.budget import RequestBudget
from kvcake.methods.registry import METHODS, build, method_names, register, register_composition
from kvcake.methods.views import DecodeView, LayerView

_INFRASTRUCTURE = {"allocation", "attention", "base", "budget", "registry", "views"}


def _discover() -> dict[str, Any]:
    """Import every method module and collect what each exports in ``__all__``."""
    exported: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name in exported and exported[name] is not getattr(module, name):
                raise ImportError(f"kvcake.methods: {name!r} is exported by two method modules")
            exported[name] = getattr(module, name)
    return exported


_METHOD_EXPORTS = _discover()
globals().update(_METHOD_EXPORTS)
#: The names the method modules export (their ``__all__``): with the names of :data:`kvcake._HOMES`, ``kvcake``'s
#: public names.
METHOD_EXPORTS: tuple[str, ...] = tuple(sorted(_METHOD_EXPORTS))

__all__ = [
    "METHODS", "METHOD_EXPORTS", "Allocator", "DecodeView", "LayerView", "Method", "NonFiniteAttentionError",
    "RequestBudget", "Scorer", "Uniform", "allocate", "build", "head_counts", "method_names", "register",
    "register_composition", "uniform", "window_attention",
]
__all__ += sorted(_METHOD_EXPORTS)
