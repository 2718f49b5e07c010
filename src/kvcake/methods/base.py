"""The contracts every method implements: a :class:`Scorer`, an :class:`Allocator`, and a :class:`Method` joining
them with a budget and options.

Each parameter is defined once, as a field of the scorer or allocator that uses it (validated in its
``__post_init__``); a method takes those parameters by name and hands each to the component that owns it, so
``CAKE(budget=128, kernel=7)`` sets CAKE's scorer's kernel and ``CAKE(budget=128, scorer=SnapKVScores(), kernel=9)``
sets SnapKV's. Composition is one argument: ``CAKE(budget=128, scorer=SnapKVScores())`` is CAKE's allocation with
SnapKV's scores (the paper's compatibility experiment), ``CAKE(budget=128, allocator=Uniform())`` CAKE's indicator
with a uniform split, ``AdaKV(SnapKV(budget=128))`` head-wise budgets over any method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from kvcake._lazy import torch
from kvcake.methods.allocation import allocate, allocate_tensor

if TYPE_CHECKING:
    from kvcake.methods.views import DecodeView, LayerView


@dataclass(frozen=True)
class Scorer:
    """Which entries of a layer matter, per KV head; higher is kept.

    Subclasses are frozen dataclasses whose fields are their parameters, validated in ``__post_init__``.

    Contract
    --------
    ``prefill(view, window)`` returns raw scores ``(B, Hkv, S)`` for every prompt position at the end of the layer's
    prefill (the engine then protects the last ``window`` positions with +inf and padding with -inf); ``decode(view)``
    returns scores ``(B, Hkv, L)`` for the stored entries at a decoding step, in the position order of
    :class:`~kvcake.methods.views.DecodeView` (only called for methods that evict while decoding).
    ``keeps_scores``: the decode scores are stored beside the entries and passed back next step (H2O's sums).
    ``all_queries``: the prefill reads every prompt query, not only the window's (the engine keeps them all).
    ``decodes``: the scorer defines decode-time scores (False: methods using it evict at prefill only).
    ``decode_from_probs``: ``decode(view)`` reads nothing but the attention (``view.attention()``), ``kv_heads`` and
    ``window``, and scores each row on its own, with free entries (probability 0) first in every row: an engine may
    then score the rows of several layers in one call, padded in front with free entries.
    ``decode_averages_groups``: ``decode(view)`` first averages the attention over each GQA group (and a view whose
    attention has one row per KV head gives the same scores, bit for bit): an engine may then average before it
    reorders the attention, which moves a group's size fewer values.
    """

    name: ClassVar[str] = "scorer"
    keeps_scores: ClassVar[bool] = False
    all_queries: ClassVar[bool] = False
    decodes: ClassVar[bool] = True
    decode_from_probs: ClassVar[bool] = False

    @property
    def decode_averages_groups(self) -> bool:
        return False

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, view: DecodeView) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} scorer defines no decode-time scores")


@dataclass(frozen=True)
class Allocator:
    """How one global budget is split across layers.

    Contract
    --------
    Either ``weights(num_layers)`` gives fixed per-layer weights (uniform, pyramid), or ``preference(view, window)``
    gives a per-row weight ``(B,)`` computed from each layer's prefill (CAKE). The split itself is always the exact,
    capped divisor method of :func:`kvcake.methods.allocation.allocate`: budgets sum to the total exactly and, in the
    cascade, never grow. Fixed weights are split over all layers at once; preferences over the layers seen so far.
    """

    name: ClassVar[str] = "allocator"

    def weights(self, num_layers: int) -> list[float] | None:
        """Fixed per-layer weights, or None when they come from each layer's prefill."""
        return [1.0] * num_layers

    def preference(self, view: LayerView, window: int) -> torch.Tensor | None:
        """Per-row preference ``(B,)`` of a prefilled layer (None for fixed weights)."""
        return None

    def preference_parts(self, view: LayerView, window: int) -> torch.Tensor | None:
        """The preference's terms that add up over attention heads, ``(B, k)``, or None for fixed weights.

        An engine that splits a layer's heads across devices (tensor parallelism) sums each device's parts and
        reads the layer's preference from :meth:`preference_of` of the sum, so every device gets the same budgets.
        An allocator whose preference cannot be summed over heads keeps this default and is refused there.
        """
        if self.weights(1) is None:
            raise NotImplementedError(f"the {self.name} allocator's preference does not add up over heads")
        return None

    def preference_of(self, parts: torch.Tensor) -> torch.Tensor:
        """The preference ``(B,)`` from parts summed over every head of the layer (see :meth:`preference_parts`)."""
        raise NotImplementedError(f"the {self.name} allocator has no preference from parts")

    def split(self, preferences: Sequence[float], total: int, cap: int, num_layers: int) -> list[int]:
        """Evictable budgets of the layers seen so far (``len(preferences)`` of them) for one row."""
        fixed = self.weights(num_layers)
        if fixed is not None:
            return allocate(fixed, total, cap)[: len(preferences)]
        return allocate(preferences, total, cap)

    def split_tensor(self, preferences: torch.Tensor, totals: torch.Tensor, caps: torch.Tensor,
                     num_layers: int) -> torch.Tensor:
        """:meth:`split` for every row at once, on the preferences' device with no host synchronisation: ``(B, m)``
        preferences of the layers seen so far, ``(B,)`` totals and caps -> ``(B, m)`` budgets, equal to
        :meth:`split` row by row (:func:`kvcake.methods.allocation.allocate_tensor`)."""
        fixed = self.weights(num_layers)
        if fixed is not None:
            weights = torch.tensor(fixed, dtype=torch.float64, device=preferences.device)
            whole = allocate_tensor(weights.expand(preferences.shape[0], -1), totals, caps)
            return whole[:, : preferences.shape[1]]
        return allocate_tensor(preferences, totals, caps)


@dataclass(frozen=True)
class Uniform(Allocator):
    """The same budget for every layer (SnapKV, H2O, TOVA, StreamingLLM; CAKE's "uniform" ablation)."""

    name: ClassVar[str] = "uniform"


#: How decode-time eviction sets each layer's target: ``resplit`` (kvcake: the budget re-split with caps grown by the
#: generated tokens) or ``prefill`` (the authors': every layer stays at its prefill budget).
DECODE_BUDGETS = ("resplit", "prefill")


#: Ada-KV's floor: every KV head keeps at least this share of the layer's per-head budget (the paper's safeguard).
HEAD_ALPHA = 0.2


def option(default: Any, help: str, *, kind: type, name: str | None = None, head_wise: bool = False) -> dict[str, Any]:
    """The metadata of a method-level parameter, declared once as a field of :class:`Method`
    (``field(metadata=option(...))``): its default (None: the method's own, from its class), its meaning, its type
    on the command line, the name it takes there (``name``, default the field's) and whether only head-wise (Ada-KV)
    methods take it."""
    return {"default": default, "help": help, "kind": kind, "name": name, "head_wise": head_wise}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, init=False)
class Method:
    """An eviction method: a scorer and an allocator under a budget.

    Parameters
    ----------
    budget : int, optional
        Cache size per layer in tokens, window included: ``(budget - window) * layers`` evictable tokens are split
        across layers by the allocator.
    ratio : float, optional
        Instead of ``budget``: keep this fraction of each prompt's KV cache, in (0, 1].
    window : int, optional
        The last ``window`` tokens are always kept (the observation window, or the recent window of H2O); default:
        the method's own.
    cascade : bool, optional
        Evict layer by layer during prefill (memory never exceeds the budget plus one layer; the default); False
        allocates once after the last layer (identical final cache, full-cache peak).
    decode_eviction : bool, optional
        Keep each layer at its budget while generating, dropping the lowest-scored non-window entry per step;
        default: the method's own.
    decode_budget : str, optional
        With decode-time eviction, each layer's target: ``resplit`` (default) re-splits the budget with caps grown
        by the generated tokens, so a layer capped by a short prompt may grow and a budget covering prompt and
        answer evicts nothing; ``prefill`` keeps every layer at its prefill budget, as the authors' code does.
    scorer, allocator : optional
        Override the method's default scorer or allocator (composition).
    head_alpha : float, optional
        Ada-KV head-wise allocation: every KV head keeps at least ``head_alpha`` of the layer's per-head budget, the
        rest goes to the best scores of any head of the layer. None: all heads keep the same count.
    **options
        Parameters of the scorer or the allocator, by name (e.g. CAKE's ``kernel``, ``gamma``, ``tau1``, ``tau2``).

    ``window``, ``cascade``, ``decode_eviction`` and ``decode_budget`` left as None take their default, written once,
    in their field's metadata (:func:`option`; :meth:`default` reads it): the command line, ``kvcake methods`` and
    the docs' parameter table read the same.
    """

    budget: int | None
    ratio: float | None
    window: int = field(metadata=option(None, "tokens at the end always kept (observation or recent window)",
                                        kind=int))
    cascade: bool = field(metadata=option(True, "evict layer by layer during prefill (False: once after the last "
                                          "layer)", kind=bool))
    decode_eviction: bool = field(metadata=option(None, "hold each layer at its budget while generating (False: "
                                                  "evict at prefill only)", kind=bool))
    decode_budget: str = field(metadata=option("resplit", "decode-time targets: resplit (kvcake) or prefill (the "
                                               "authors': prefill budgets)", kind=str))
    scorer: Scorer
    allocator: Allocator
    head_alpha: float | None = field(metadata=option(None, "Ada-KV: each head's floor as a share of the budget",
                                                     kind=float, name="alpha", head_wise=True))

    name: ClassVar[str] = "method"
    scorer_type: ClassVar[type[Scorer] | None] = None
    allocator_type: ClassVar[type[Allocator]] = Uniform
    default_window: ClassVar[int] = 32
    default_decode_eviction: ClassVar[bool] = False

    def __init__(self, budget: int | None = None, ratio: float | None = None, *, window: int | None = None,
                 cascade: bool | None = None, decode_eviction: bool | None = None, decode_budget: str | None = None,
                 scorer: Scorer | None = None, allocator: Allocator | None = None, head_alpha: float | None = None,
                 **options: Any) -> None:
        # window, cascade, decode_eviction, decode_budget: None takes the default (:meth:`default`)
        if scorer is None:
            if self.scorer_type is None:
                raise TypeError("Method needs a scorer: pass scorer=... or use a named method such as CAKE or SnapKV")
            scorer = self.scorer_type()
        if allocator is None:
            allocator = self.allocator_type()
        scorer, allocator = self._route(options, scorer, allocator)
        given = {"window": window, "cascade": cascade, "decode_eviction": decode_eviction,
                 "decode_budget": decode_budget}
        values = {"budget": budget, "ratio": ratio,
                  **{key: self.default(key, budget) if value is None else value for key, value in given.items()},
                  "scorer": scorer, "allocator": allocator, "head_alpha": head_alpha}
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self.validate()

    # -- parameters --------------------------------------------------------------------------------------------------
    @classmethod
    def default(cls, key: str, budget: int | None = None) -> Any:
        """The default of option ``key`` for this method: the field's, or where the field leaves it to the method
        (None), the method's own: its window for ``budget``, whether it evicts while decoding."""
        value = OPTIONS[key].metadata["default"]
        if value is not None:
            return value
        if key == "window":
            return cls.window_for(budget)
        if key == "decode_eviction":
            return cls.default_decode_eviction
        return None

    @classmethod
    def described_default(cls, key: str) -> Any:
        """:meth:`default` for help texts (the window in words: it may depend on the budget)."""
        return cls.describe_window() if key == "window" else cls.default(key)

    @classmethod
    def window_for(cls, budget: int | None) -> int:
        """The default window for a budget (most methods: a constant)."""
        return cls.default_window

    @classmethod
    def describe_window(cls) -> str:
        """The default window in words (for help texts)."""
        return str(cls.default_window)

    def _route(self, options: dict[str, Any], scorer: Scorer, allocator: Allocator) -> tuple[Scorer, Allocator]:
        """Hand each option to the component (scorer first, then allocator) that has a field of that name."""
        unknown = []
        for key, value in options.items():
            if key in {f.name for f in fields(scorer)}:
                scorer = dataclasses.replace(scorer, **{key: value})
            elif key in {f.name for f in fields(allocator)}:
                allocator = dataclasses.replace(allocator, **{key: value})
            else:
                unknown.append(key)
        if unknown:
            takes = ["budget", "ratio", *(key for key, f in OPTIONS.items() if not f.metadata["head_wise"]),
                     *(f.name for f in fields(scorer)), *(f.name for f in fields(allocator))]
            raise TypeError(f"{self.name} has no parameter(s) {', '.join(sorted(unknown))}; it takes: "
                            f"{', '.join(takes)}")
        return scorer, allocator

    def __getattr__(self, key: str) -> Any:
        # Read a component's parameter through the method (``cake.gamma``, ``snapkv.kernel``).
        if key.startswith("_") or key in METHOD_FIELDS:
            raise AttributeError(key)
        for part in (self.__dict__.get("scorer"), self.__dict__.get("allocator")):
            if part is not None and key in {f.name for f in fields(part)}:
                return getattr(part, key)
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def validate(self) -> None:
        """Check the budget and options (subclasses add their own checks and call this)."""
        if (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) or ratio (fraction of the prompt)")
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if self.budget is not None:
            if not _is_int(self.budget):
                raise TypeError(f"budget must be an integer number of tokens per layer, got {self.budget!r}")
            if self.budget <= 0:
                raise ValueError(f"budget must be a positive number of tokens per layer, got {self.budget}")
            if self.budget < self.window:
                raise ValueError(
                    f"budget ({self.budget} tokens per layer) is smaller than the window ({self.window}); the window "
                    "is always kept, so the budget must be at least the window"
                )
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")  # also rejects NaN
        if self.decode_budget not in DECODE_BUDGETS:
            raise ValueError(f"decode_budget must be one of {', '.join(DECODE_BUDGETS)}, got {self.decode_budget!r}")
        if self.decode_eviction and not getattr(self.scorer, "decodes", True):
            raise ValueError(f"the {self.scorer.name} scorer evicts at prefill only; set decode_eviction=False")
        if self.head_alpha is not None:
            if not (isinstance(self.head_alpha, (int, float)) and 0 <= self.head_alpha <= 1):
                raise ValueError(f"head_alpha must be in [0, 1], got {self.head_alpha}")
            if self.decode_eviction:
                raise ValueError("head-wise (Ada-KV) allocation evicts at prefill only; set decode_eviction=False")

    def with_options(self, **changes: Any) -> Method:
        """A copy with some fields or component parameters changed (validated again)."""
        current = {key: getattr(self, key) for key in METHOD_FIELDS}
        return type(self)(**{**current, **changes})

    # -- budget ------------------------------------------------------------------------------------------------------
    def total_budget(self, prompt_tokens: int, num_layers: int) -> int:
        """Evictable tokens (window excluded) for ``prompt_tokens`` real prompt tokens over ``num_layers`` layers."""
        if self.budget is not None:
            return (self.budget - self.window) * num_layers
        assert self.ratio is not None
        kept = round(self.ratio * prompt_tokens * num_layers)
        return max(0, kept - self.window * num_layers)

    # -- naming ------------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """Name that says what was composed, e.g. ``ada-snapkv`` or ``cake[scorer=h2o]``."""
        parts = []
        if self.scorer_type is None or type(self.scorer) is not self.scorer_type:
            parts.append(f"scorer={self.scorer.name}")
        if type(self.allocator) is not self.allocator_type:
            parts.append(f"allocator={self.allocator.name}")
        label = self.name + (f"[{','.join(parts)}]" if parts else "")
        return ("ada-" + label) if self.head_alpha is not None else label

    def parameters(self) -> dict[str, Any]:
        """Plain parameters (for reports and JSON): the method's own, then each component's."""
        out: dict[str, Any] = {"name": self.label}
        for key in METHOD_FIELDS:
            value = getattr(self, key)
            if key in ("scorer", "allocator"):
                value = {"name": value.name, **{f.name: getattr(value, f.name) for f in fields(value)}}
            out[key] = value
        return out


#: The fields of a method, in order (what :meth:`Method.with_options` copies and :meth:`Method.parameters` reports).
METHOD_FIELDS = tuple(f.name for f in fields(Method))
#: The method-level options (besides budget/ratio and the components), by field name, each with its metadata.
OPTIONS: dict[str, Field] = {f.name: f for f in fields(Method) if "help" in f.metadata}


def check_positive(name: str, value: float) -> None:
    """A finite, strictly positive parameter."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and positive, got {value}")


__all__ = ["HEAD_ALPHA", "METHOD_FIELDS", "OPTIONS", "Allocator", "Method", "Scorer", "Uniform", "check_positive",
           "option"]
