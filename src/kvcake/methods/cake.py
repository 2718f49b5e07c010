"""CAKE: Cascading and Adaptive KV cache Eviction (Qin et al., ICLR 2025, arXiv 2503.12491), all in one file.

* §3.1 layer preference: spatial dispersion H and temporal shift V of each layer's window attention,
  P = H^(1/tau1) * V^(1/tau2) — :func:`window_statistics`, :func:`layer_preference`, :class:`Preference`;
* §3.2 budget allocation: B_l = P_l / sum P * B_total, made exact and capped by the divisor method shared by every
  allocator (:func:`kvcake.methods.allocation.allocate`);
* §3.3 cascading memory management: the split is redone after every layer during prefill and earlier layers are
  evicted to their new share (:class:`kvcake.methods.budget.RequestBudget` runs it; ``cascade=True``);
* §3.3 eviction indicator: mean + gamma * var of window attention, average-pooled and GQA-averaged —
  :class:`CakeScores`;
* §3.4 decoding: each layer stays at its budget, dropping the entry the current query attends least (pooled,
  GQA-averaged, no variance term) — :meth:`CakeScores.decode` (``decode_eviction=True``).

Defaults are the paper's: observation window 32, pooling kernel 5, gamma 200, tau1 = tau2 = 1 unless a published
preset applies, cascading prefill, decode-time budget maintenance.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from kvcake._lazy import torch
from kvcake.methods.attention import check_kernel, group_mean, pool_scores
from kvcake.methods.base import Allocator, Method, Scorer, Uniform, check_positive
from kvcake.methods.h2o import H2OScores
from kvcake.methods.registry import register, register_composition
from kvcake.methods.snapkv import SnapKV, SnapKVScores

if TYPE_CHECKING:
    from kvcake.methods.views import DecodeView, LayerView

#: The authors' published temperatures (tau1, tau2) per model at 128 and 1024 tokens per layer.
TAU_PRESETS: dict[str, dict[int, tuple[float, float]]] = {
    "llama-3.1-8b-instruct": {128: (1.6, 0.6), 1024: (1.6, 0.4)},
    "llama-2-7b-chat": {128: (0.9, 2.3), 1024: (1.9, 1.8)},
    "llama-2-13b-chat": {128: (1.8, 2.0), 1024: (0.5, 0.4)},
    "mistral-7b-instruct-v0.3": {128: (1.0, 0.8), 1024: (0.8, 0.5)},
    "qwen2.5-7b-instruct": {128: (0.4, 0.6), 1024: (1.5, 0.6)},
}


def _nearest(table: dict, value: float) -> tuple[float, float]:
    """The entry of ``table`` whose key is nearest to ``value`` on a log scale (the smaller key on a tie)."""
    key = min(sorted(table), key=lambda k: abs(math.log(float(k)) - math.log(max(value, 1e-12))))
    return table[key]


def _calibrated(path: str, budget: int | None, ratio: float | None) -> tuple[float, float]:
    """(tau1, tau2) from a ``tau.json`` written by ``kvcake calibrate`` (:mod:`kvcake.calibrate`)."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        budgets = {int(k): (float(v[0]), float(v[1])) for k, v in (data.get("budgets") or {}).items()}
        ratios = {float(k): (float(v[0]), float(v[1])) for k, v in (data.get("ratios") or {}).items()}
    except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a tau file written by kvcake calibrate ({exc})") from None
    if ratio is not None and ratios:
        return _nearest(ratios, ratio)
    if budgets:
        return _nearest(budgets, budget if budget is not None else 128)
    if ratios:
        raise ValueError(f"{path} calibrates ratios only ({', '.join(map(str, sorted(ratios)))}): give a ratio")
    raise ValueError(f"{path} holds no calibrated budget or ratio")


def tau_preset(model: str, budget: int | None = None, ratio: float | None = None) -> tuple[float, float]:
    """(tau1, tau2) for ``model`` at the calibrated budget nearest to ``budget`` (on a log scale).

    ``model`` is a published preset's name (:data:`TAU_PRESETS`: the authors tuned tau at 128 and 1024 tokens per
    layer; other budgets take the nearer of the two, our choice, documented in docs/method.md; without a budget,
    128), or the path of a ``tau.json`` written by ``kvcake calibrate``: its nearest calibrated ratio when
    ``ratio`` is given and the file calibrated ratios, else its nearest calibrated budget.
    """
    if model.lower().endswith(".json") and os.path.isfile(model):
        return _calibrated(model, budget, ratio)
    key = model.lower().split("/")[-1]
    if key not in TAU_PRESETS:
        raise KeyError(f"no published tau for {model!r}; known presets: {', '.join(sorted(TAU_PRESETS))}, or the "
                       "path of a tau.json written by kvcake calibrate")
    return _nearest(TAU_PRESETS[key], budget if budget is not None else 128)


# -- §3.1 statistics of the window attention --------------------------------------------------------------------------
@dataclass
class WindowStatistics:
    """What CAKE needs from one layer's window attention.

    Attributes
    ----------
    entropy : Tensor ``(B,)`` float64
        Spatial dispersion H = -sum W log W over heads, window rows and non-window keys.
    variance : Tensor ``(B,)`` float64
        Temporal shift V = sum over heads and keys of the unbiased variance across window rows.
    mean, row_var : Tensor ``(B, Hq, S - W)`` float32
        Per query head and non-window key: mean and unbiased variance over the window rows.
    """

    entropy: torch.Tensor
    variance: torch.Tensor
    mean: torch.Tensor
    row_var: torch.Tensor

    def indicator(self, gamma: float, kernel: int, kv_heads: int, pooling: str = "avg") -> torch.Tensor:
        """CAKE's eviction indicator ``(B, Hkv, S - W)``: mean + gamma * var, pooled, GQA-averaged (§3.3)."""
        return group_mean(pool_scores(self.mean + gamma * self.row_var, kernel, pooling), kv_heads)


def window_statistics(attn: torch.Tensor) -> WindowStatistics:
    """CAKE's layer statistics from window attention ``(B, Hq, W, S)`` (§3.1).

    W = A[..., :S-W] (window rows, keys before the window), not renormalised. Padding columns carry exactly zero
    probability, so they add nothing to H or V and look like the zero padding of the pooling: a padded row gets the
    same statistics as when run alone.
    """
    window, seq = attn.shape[2], attn.shape[3]
    past = attn[..., : seq - window]
    entropy = -torch.xlogy(past, past).sum(dim=(1, 2, 3)).double()
    # Unbiased variance across the window rows, per query head and key (B, Hq, S - W).
    row_var = past.var(dim=2, unbiased=True) if window > 1 and past.shape[-1] > 0 else torch.zeros_like(past[:, :, 0])
    variance = row_var.sum(dim=(1, 2)).double()
    return WindowStatistics(entropy=entropy, variance=variance, mean=past.mean(dim=2), row_var=row_var)


def layer_preference(entropy: torch.Tensor, variance: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """P = H^(1/tau1) * V^(1/tau2) (CAKE eq. 4; note the exponents are 1/tau)."""
    return entropy.clamp_min(0).pow(1.0 / tau1) * variance.clamp_min(0).pow(1.0 / tau2)


def _statistics(view: LayerView, window: int) -> WindowStatistics:
    """The layer's statistics, computed once and shared by CAKE's scorer and allocator."""
    w = min(window, view.seq)
    return view.memo(("cake-statistics", w), lambda: window_statistics(view.window_attention(w)))


# -- §3.3 / §3.4 the indicator ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CakeScores(Scorer):
    """CAKE's indicator mean + gamma * var of window attention, average-pooled, GQA-averaged (§3.3).

    At decode time: the current query's attention, pooled and GQA-averaged (§3.4). ``decode_pooling`` says over
    what: ``all`` (default) pools over every stored entry, the window included, and the window is then protected;
    ``outside-window`` cuts the window off first and pools the rest with zero padding, as the authors' code does
    (the entries next to the window then score without their window neighbours).

    ``pooling`` is the paper's average pooling by default; ``max`` (SnapKV's) is an ablation of ours, not in the
    paper (composition ``cake-max-pooling``): it tells the indicator's pooling apart from its statistic.
    """

    gamma: float = field(default=200.0, metadata={"help": "CAKE: weight of the variance in mean + gamma * var"})
    kernel: int = field(default=5, metadata={"help": "pooling kernel along keys (odd)"})
    decode_pooling: str = field(default="all", metadata={
        "help": "CAKE decoding: pool over all entries (all) or the entries outside the window (outside-window)"})
    pooling: str = field(default="avg", metadata={"help": "CAKE: pooling of the indicator along keys, avg or max"})

    name: ClassVar[str] = "cake"
    decode_from_probs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_kernel(self.kernel)
        if not (isinstance(self.gamma, (int, float)) and 0 <= self.gamma < math.inf):
            raise ValueError(f"gamma must be finite and non-negative, got {self.gamma}")
        if self.decode_pooling not in ("all", "outside-window"):
            raise ValueError(f"decode_pooling must be 'all' or 'outside-window', got {self.decode_pooling!r}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        stats = _statistics(view, window)
        return view.with_window(stats.indicator(self.gamma, self.kernel, view.kv_heads, self.pooling))

    @property
    def decode_averages_groups(self) -> bool:
        return self.pooling == "avg"

    def decode(self, view: DecodeView) -> torch.Tensor:
        attention = view.attention()
        if self.pooling == "avg" and attention.shape[1] != view.kv_heads:  # (averaged already: one row per KV head)
            # Average pooling and the group mean are both linear: averaging the group first pools G times fewer rows.
            attention = group_mean(attention, view.kv_heads)
        if self.decode_pooling == "all" or view.window <= 0:
            pooled = pool_scores(attention, self.kernel, self.pooling)
        else:
            cut = max(0, attention.shape[-1] - view.window)
            pooled = torch.cat([pool_scores(attention[..., :cut], self.kernel, self.pooling), attention[..., cut:]],
                               dim=-1)
        return pooled if self.pooling == "avg" else group_mean(pooled, view.kv_heads)


# -- §3.1 / §3.2 the allocation ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preference(Allocator):
    """CAKE's layer preference P = H^(1/tau1) * V^(1/tau2) of window attention (§3.1-3.2)."""

    tau1: float = field(default=1.0, metadata={"help": "CAKE: temperature of the spatial dispersion H"})
    tau2: float = field(default=1.0, metadata={"help": "CAKE: temperature of the temporal shift V"})

    name: ClassVar[str] = "preference"

    def __post_init__(self) -> None:
        check_positive("tau1", self.tau1)
        check_positive("tau2", self.tau2)

    def weights(self, num_layers: int) -> list[float] | None:
        return None

    def preference(self, view: LayerView, window: int) -> torch.Tensor:
        return self.preference_of(self.preference_parts(view, window))

    def preference_parts(self, view: LayerView, window: int) -> torch.Tensor:
        """H and V ``(B, 2)``: both are sums over heads (:func:`window_statistics`)."""
        stats = _statistics(view, window)
        return torch.stack([stats.entropy, stats.variance], dim=-1)

    def preference_of(self, parts: torch.Tensor) -> torch.Tensor:
        return layer_preference(parts[..., 0], parts[..., 1], self.tau1, self.tau2)


@register("cake", about="CAKE: preference allocation, cascade, mean+gamma*var indicator", color="tab:red")
class CAKE(Method):
    """Cascading and Adaptive KV cache Eviction.

    Layer budgets follow the preference P = H^(1/tau1) * V^(1/tau2) of each layer's window attention; tokens are kept
    by mean + gamma * var of the window attention, pooled and GQA-averaged; the split is redone after every layer
    during prefill (the cascade) and every layer is held at its budget while decoding. Takes the parameters of
    :class:`~kvcake.methods.base.Method` and ``kernel``, ``gamma`` (:class:`CakeScores`), ``tau1``, ``tau2``
    (:class:`Preference`).
    """

    scorer_type = CakeScores
    allocator_type = Preference
    default_decode_eviction = True

    @classmethod
    def from_preset(cls, model: str, budget: int | None = None, ratio: float | None = None, **kwargs) -> CAKE:
        """CAKE with the authors' published temperatures for ``model`` (see :data:`TAU_PRESETS`), or the ones a
        ``tau.json`` written by ``kvcake calibrate`` holds for the nearest budget or ratio (:func:`tau_preset`)."""
        tau1, tau2 = tau_preset(model, budget, ratio)
        return cls(budget=budget, ratio=ratio, tau1=tau1, tau2=tau2, **kwargs)


register_composition("cake-snapkv", "CAKE's allocation with SnapKV's scores (the paper's compatibility experiment)",
                     CAKE, scorer=SnapKVScores, color="tab:olive")
register_composition("cake-h2o", "CAKE's allocation with H2O's accumulated scores", CAKE, scorer=H2OScores,
                     color="tab:gray")
register_composition("cake-max-pooling", "CAKE with its indicator max-pooled as SnapKV's (an ablation, not the "
                     "paper's)", CAKE, pooling="max", color="magenta")
register_composition("uniform-cake", "CAKE's indicator with a uniform split (the paper's ablation)", CAKE,
                     allocator=Uniform, color="gold")
register_composition("cake-authors-decoding", "CAKE decoding as the authors' code does: every layer at its prefill "
                     "budget, decode scores pooled outside the window", CAKE, decode_budget="prefill",
                     decode_pooling="outside-window", color="darkred")
register_composition("snapkv-cake-alloc", "SnapKV with CAKE's preference allocation (tau1 = tau2 = 1)", SnapKV,
                     allocator=Preference, color="navy")

__all__ = ["CAKE", "TAU_PRESETS", "CakeScores", "Preference", "WindowStatistics", "layer_preference", "tau_preset",
           "window_statistics"]
