"""Deferred import of torch for the method layer.

The method classes (their parameters, defaults and validation) are read by the command line to build its options
and check arguments; importing torch takes seconds, so those modules must be importable without it. They take
``torch`` from here: the real module when it is already imported (the usual case in a program that runs a model),
else a module whose body runs on first attribute access (:class:`importlib.util.LazyLoader`, the standard library's
mechanism). Nothing is patched: the first use of any ``torch`` attribute simply imports torch.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING


def lazy_module(name: str) -> ModuleType:
    """``name`` imported now if it already is, else on the first attribute access."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"{name} is not installed")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["lazy_module", "torch"]
