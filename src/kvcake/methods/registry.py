"""Methods by name, filled by the method files themselves: the command line, ``kvcake methods``, the evaluation grid
and the method-matrix tests are all generated from it.

A method file registers its method class with ``@register("name", about=...)`` and, if it likes, named compositions
with :func:`register_composition` (``cake-snapkv`` = CAKE with SnapKV's scorer). Every module of
:mod:`kvcake.methods` is imported by the package, so a new method is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from kvcake.methods.base import Allocator, Method, Scorer

#: Types a parameter can take on the command line, by annotation.
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}

#: Method-level parameters (besides budget/ratio) with their meaning.
METHOD_PARAMETERS: dict[str, tuple[type, str]] = {
    "window": (int, "tokens at the end always kept (observation or recent window)"),
    "cascade": (bool, "evict layer by layer during prefill (False: once after the last layer)"),
    "decode_eviction": (bool, "hold each layer at its budget while generating (False: evict at prefill only)"),
    "decode_budget": (str, "decode-time targets: resplit (kvcake) or prefill (the authors': prefill budgets)"),
}


@dataclass(frozen=True)
class Parameter:
    """One parameter a named method takes: ``owner`` is ``method`` or the scorer's/allocator's name."""

    name: str
    kind: type
    default: Any
    help: str
    owner: str


@dataclass(frozen=True)
class Entry:
    """A named method: its class, and the scorer/allocator it swaps in (a composition) or fixes."""

    name: str
    about: str
    method: type[Method] | None  # None: the full cache
    scorer: type[Scorer] | None = None
    allocator: type[Allocator] | None = None
    head_wise: bool = False  # Ada-KV head-wise budgets: takes ``alpha``
    fixed: tuple[tuple[str, Any], ...] = ()

    def components(self) -> tuple[type[Scorer], type[Allocator]]:
        assert self.method is not None
        scorer = self.scorer or self.method.scorer_type
        assert scorer is not None, f"{self.name}: no scorer"
        return scorer, self.allocator or self.method.allocator_type

    def parameters(self) -> list[Parameter]:
        """What the method takes besides budget/ratio, with this method's defaults."""
        if self.method is None:
            return []
        fixed = dict(self.fixed)
        out = []
        for key, (kind, text) in METHOD_PARAMETERS.items():
            if key in fixed:
                continue
            if key == "window":
                default: Any = self.method.describe_window()
            elif key == "cascade":
                default = True
            elif key == "decode_budget":
                default = "resplit"
            else:
                default = self.method.default_decode_eviction
            out.append(Parameter(key, kind, default, text, "method"))
        if self.head_wise:
            out.append(Parameter("alpha", float, 0.2, "Ada-KV: each head's floor as a share of the budget", "method"))
        for part in self.components():
            for f in fields(part):
                default = f.default if f.default is not MISSING else None
                kind = _TYPES.get(str(f.type), str)
                out.append(Parameter(f.name, kind, default, f.metadata.get("help", ""), part.name))
        return out

    def build(self, budget: int | None = None, ratio: float | None = None, **params: Any) -> Method | None:
        """Instantiate with a budget and parameters; parameters left as None keep the method's defaults."""
        if self.method is None:
            return None
        given = {k: v for k, v in params.items() if v is not None}
        for key, value in self.fixed:
            if key in given and given.pop(key) != value:
                if key == "decode_eviction" and value is False:
                    raise ValueError(f"method {self.name!r} evicts at prefill only: decode_eviction is always False")
                raise ValueError(f"method {self.name!r} always has {key}={value}")
        allowed = {p.name for p in self.parameters()}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; it takes: "
                             f"{', '.join(sorted(allowed))}")
        alpha = given.pop("alpha", 0.2) if self.head_wise else None
        own = {key: given.pop(key) for key in list(given) if key in METHOD_PARAMETERS}
        scorer_type, allocator_type = self.components()
        scorer = scorer_type(**{k: given.pop(k) for k in list(given) if k in {f.name for f in fields(scorer_type)}})
        allocator = allocator_type(**{k: given.pop(k) for k in list(given)
                                      if k in {f.name for f in fields(allocator_type)}})
        return self.method(budget=budget, ratio=ratio, scorer=scorer, allocator=allocator, head_alpha=alpha,
                           **{**own, **dict(self.fixed)})


METHODS: dict[str, Entry] = {"full": Entry("full", "no eviction (the reference)", None)}


def register(name: str, about: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method class available under ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        _add(Entry(name, about, cls))
        cls.name = name
        return cls

    return wrap


def register_composition(name: str, about: str, method: type[Method], *, scorer: type[Scorer] | None = None,
                         allocator: type[Allocator] | None = None, head_wise: bool = False, **fixed: Any) -> None:
    """Make a composition available under ``name`` (e.g. CAKE's allocation with SnapKV's scorer)."""
    _add(Entry(name, about, method, scorer, allocator, head_wise, tuple(sorted(fixed.items()))))


def unregister(name: str) -> None:
    """Remove a name (for tests that register a throwaway method)."""
    if name == "full":
        raise ValueError("the full cache cannot be unregistered")
    METHODS.pop(name)


def _add(entry: Entry) -> None:
    if entry.name in METHODS:
        raise ValueError(f"method {entry.name!r} is registered twice")
    if entry.name != entry.name.lower() or not entry.name.replace("-", "").isalnum():
        raise ValueError(f"method names are lowercase letters, digits and '-', got {entry.name!r}")
    METHODS[entry.name] = entry


def method_names() -> list[str]:
    """Every name, the full cache and CAKE first."""
    rest = sorted(n for n in METHODS if n not in ("full", "cake"))
    return [n for n in ("full", "cake") if n in METHODS] + rest


def parameters(name: str) -> list[Parameter]:
    """The parameters method ``name`` takes (besides budget/ratio)."""
    return entry(name).parameters()


def entry(name: str) -> Entry:
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    return METHODS[key]


def build(name: str, budget: int | None = None, ratio: float | None = None, **params: Any) -> Method | None:
    """Instantiate method ``name`` (None for ``full``) with a budget and validated parameters."""
    return entry(name).build(budget=budget, ratio=ratio, **params)


def all_parameters() -> dict[str, list[tuple[str, Parameter]]]:
    """Every parameter name any method takes -> the (method, parameter) pairs that take it (CLI options)."""
    table: dict[str, list[tuple[str, Parameter]]] = {}
    for name in method_names():
        for p in METHODS[name].parameters():
            table.setdefault(p.name, []).append((name, p))
    return table


__all__ = ["METHODS", "Entry", "Parameter", "all_parameters", "build", "entry", "method_names", "parameters",
           "register", "register_composition", "unregister"]
