"""The method layer: scorers, allocators and the budget policy, pure torch, no transformers imports.

Every module of this package is imported here, so each method file registers itself (see
:mod:`kvcake.methods.registry`) and its public names are exported from ``kvcake.methods`` (and ``kvcake``): a new
method is one new file. torch is imported on first use only (:mod:`kvcake._lazy`), so the command line can read the
methods and check arguments without it.
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
