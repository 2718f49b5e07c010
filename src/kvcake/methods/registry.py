"""Methods by name, filled by the method files themselves: the command line, ``kvcake methods``, the evaluation grid
and the method-matrix tests are all generated from it.

A method file registers its method class with ``@register("name", about=...)`` and, if it likes, named compositions
with :func:`register_composition` (``cake-snapkv`` = CAKE with SnapKV's scorer). Every module of
:mod:`kvcake.methods` is imported by the package, so a new method is one new file.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from kvcake.methods.base import HEAD_ALPHA, OPTIONS, Allocator, Method, Scorer

#: Types a parameter can take on the command line, by annotation.
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}

#: Method-level parameters (besides budget/ratio) every method takes, with their type and meaning: the options of
#: :class:`~kvcake.methods.base.Method` (its fields), but Ada-KV's floor, which only head-wise methods take.
METHOD_PARAMETERS: dict[str, tuple[type, str]] = {
    key: (f.metadata["kind"], f.metadata["help"]) for key, f in OPTIONS.items() if not f.metadata["head_wise"]}


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
    color: str = ""  # its colour in every plot (a matplotlib colour name); "" until registered

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
        for key, f in OPTIONS.items():
            if key in fixed or (f.metadata["head_wise"] and not self.head_wise):
                continue
            default = HEAD_ALPHA if f.metadata["head_wise"] else self.method.described_default(key)
            out.append(Parameter(f.metadata["name"] or key, f.metadata["kind"], default, f.metadata["help"], "method"))
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
        alpha = given.pop(OPTIONS["head_alpha"].metadata["name"], HEAD_ALPHA) if self.head_wise else None
        own = {key: given.pop(key) for key in list(given) if key in METHOD_PARAMETERS}
        scorer_type, allocator_type = self.components()
        scorer = scorer_type(**{k: given.pop(k) for k in list(given) if k in {f.name for f in fields(scorer_type)}})
        allocator = allocator_type(**{k: given.pop(k) for k in list(given)
                                      if k in {f.name for f in fields(allocator_type)}})
        return self.method(budget=budget, ratio=ratio, scorer=scorer, allocator=allocator, head_alpha=alpha,
                           **{**own, **dict(self.fixed)})


METHODS: dict[str, Entry] = {"full": Entry("full", "no eviction (the reference)", None, color="black")}

#: Colours for a method registered without one (a user's, a test's): the first one no registered method holds.
PALETTE = ("indigo", "crimson", "darkkhaki", "slateblue", "chocolate", "darkcyan", "orchid", "yellowgreen", "olive",
           "peru", "steelblue", "firebrick", "darkviolet", "seagreen", "tomato", "cadetblue", "rosybrown", "plum")


def register(name: str, about: str, *, color: str | None = None) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method class available under ``name`` (``color``: its colour in every plot; by
    default the first free one of :data:`PALETTE`)."""

    def wrap(cls: type[Method]) -> type[Method]:
        _add(Entry(name, about, cls), color)
        cls.name = name
        return cls

    return wrap


def register_composition(name: str, about: str, method: type[Method], *, scorer: type[Scorer] | None = None,
                         allocator: type[Allocator] | None = None, head_wise: bool = False, color: str | None = None,
                         **fixed: Any) -> None:
    """Make a composition available under ``name`` (e.g. CAKE's allocation with SnapKV's scorer)."""
    _add(Entry(name, about, method, scorer, allocator, head_wise, tuple(sorted(fixed.items()))), color)


def unregister(name: str) -> None:
    """Remove a name (for tests that register a throwaway method)."""
    if name == "full":
        raise ValueError("the full cache cannot be unregistered")
    METHODS.pop(name)


def _add(entry: Entry, color: str | None) -> None:
    if entry.name in METHODS:
        raise ValueError(f"method {entry.name!r} is registered twice")
    if entry.name != entry.name.lower() or not entry.name.replace("-", "").isalnum():
        raise ValueError(f"method names are lowercase letters, digits and '-', got {entry.name!r}")
    taken = {e.color: e.name for e in METHODS.values()}
    if color is None:
        free = [c for c in PALETTE if c not in taken]
        if not free:
            raise ValueError(f"method {entry.name!r}: every colour of PALETTE is taken; pass color=...")
        color = free[0]
    elif color in taken:
        raise ValueError(f"method {entry.name!r}: colour {color!r} is {taken[color]!r}'s already")
    METHODS[entry.name] = dataclasses.replace(entry, color=color)


def color(name: str) -> str:
    """The colour of method ``name`` in every plot: its registered one. A name no method is registered under (a
    method of older results) takes a colour of :data:`PALETTE` by a hash of its name, the same in every plot."""
    found = METHODS.get(name)
    if found is not None:
        return found.color
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


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


def _text(value: Any) -> str:
    return "none" if value is None else str(value)


def parameter_table() -> str:
    """The markdown table of docs/methods.md: every method with the parameters it takes and their defaults (what
    ``kvcake methods`` prints), generated from the registry; ``tests/test_exports.py`` checks the docs hold it."""
    lines = ["| method | parameters (defaults) |", "|---|---|"]
    for name in method_names():
        found = METHODS[name]
        takes = "budget or ratio; " if found.method is not None else ""
        params = ", ".join(f"`{p.name}={_text(p.default)}`" for p in found.parameters())
        lines.append(f"| `{name}` | {takes}{params or 'nothing'} |")
    return "\n".join(lines) + "\n"


__all__ = ["METHODS", "PALETTE", "Entry", "Parameter", "all_parameters", "build", "color", "entry", "method_names",
           "parameter_table", "parameters", "register", "register_composition", "unregister"]
