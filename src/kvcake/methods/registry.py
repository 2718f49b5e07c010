"""Methods by name, for the command line and the evaluation harness."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kvcake.methods.allocators import Preference, Uniform
from kvcake.methods.baselines import H2O, TOVA, AdaKV, PyramidKV, SnapKV, StreamingLLM
from kvcake.methods.cake import CAKE
from kvcake.methods.method import Method
from kvcake.methods.scorers import H2OScores, SnapKVScores


@dataclasses.dataclass(frozen=True)
class Entry:
    """A named method: the class whose parameters it takes, and how to build it."""

    cls: type[Method] | None
    build: Callable[..., Method | None]
    about: str


def _plain(cls):
    return lambda **kw: cls(**kw)


METHODS: dict[str, Entry] = {
    "full": Entry(None, lambda **kw: None, "no eviction (the reference)"),
    "cake": Entry(CAKE, _plain(CAKE), "CAKE: preference allocation, cascade, mean+gamma*var indicator"),
    "snapkv": Entry(SnapKV, _plain(SnapKV), "SnapKV: pooled window attention, uniform budgets"),
    "pyramidkv": Entry(PyramidKV, _plain(PyramidKV), "PyramidKV: SnapKV scores, pyramid budgets"),
    "h2o": Entry(H2O, _plain(H2O), "H2O: accumulated attention + recent window, decode-time eviction"),
    "tova": Entry(TOVA, _plain(TOVA), "TOVA: newest token's head-averaged attention, every step"),
    "streamingllm": Entry(StreamingLLM, _plain(StreamingLLM), "StreamingLLM: attention sinks + recent window"),
    "ada-snapkv": Entry(SnapKV, lambda alpha=0.2, **kw: AdaKV(SnapKV(**kw), alpha), "Ada-KV head-wise SnapKV"),
    "ada-cake": Entry(CAKE, lambda alpha=0.2, **kw: AdaKV(CAKE(**{**kw, "decode_eviction": False}), alpha),
                      "Ada-KV head-wise budgets under CAKE's layer allocation"),
    "cake-snapkv": Entry(CAKE, lambda **kw: CAKE(scorer=SnapKVScores(), **kw),
                         "CAKE's allocation with SnapKV's scores (the paper's compatibility experiment)"),
    "cake-h2o": Entry(CAKE, lambda **kw: CAKE(scorer=H2OScores(), **kw),
                      "CAKE's allocation with H2O's accumulated scores"),
    "uniform-cake": Entry(CAKE, lambda **kw: CAKE(allocator=Uniform(), **kw),
                          "CAKE's indicator with a uniform split (the paper's ablation)"),
    "snapkv-cake-alloc": Entry(SnapKV, lambda **kw: SnapKV(allocator=Preference(), **kw),
                               "SnapKV with CAKE's preference allocation (tau1 = tau2 = 1)"),
}


def method_names() -> list[str]:
    return list(METHODS)


def parameters(name: str) -> list[dataclasses.Field]:
    """The parameters method ``name`` takes (besides budget/ratio)."""
    entry = METHODS[name]
    if entry.cls is None:
        return []
    skip = {"budget", "ratio", "scorer", "allocator", "head_alpha"}
    return [f for f in dataclasses.fields(entry.cls) if f.name not in skip]


def build(name: str, budget: int | None = None, ratio: float | None = None, **params: Any) -> Method | None:
    """Instantiate method ``name`` (None for ``full``) with a budget and validated parameters.

    Parameters left as None are not passed, so each method keeps its paper's defaults.
    """
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    entry = METHODS[key]
    if entry.cls is None:
        return None
    allowed = {f.name for f in parameters(key)} | ({"alpha"} if key.startswith("ada-") else set())
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(sorted(allowed))}")
    return entry.build(budget=budget, ratio=ratio, **given)
