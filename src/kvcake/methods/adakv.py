"""Ada-KV (Feng et al., 2024, arXiv 2407.11550): head-wise budgets inside each layer, over any method."""

from __future__ import annotations

from kvcake.methods.base import HEAD_ALPHA, Method
from kvcake.methods.cake import CAKE
from kvcake.methods.registry import register_composition
from kvcake.methods.snapkv import SnapKV


def AdaKV(method: Method, alpha: float = HEAD_ALPHA) -> Method:  # noqa: N802 (reads as a method name)
    """Head-wise allocation over any method's scores and layer split.

    Each KV head keeps at least ``alpha`` of the layer's per-head budget (the paper's safeguard, default
    :data:`~kvcake.methods.base.HEAD_ALPHA`); the rest of the layer's budget goes to the best scores of any head
    (:func:`kvcake.methods.allocation.head_counts`). Heads then hold different numbers of tokens: the layer is stored
    padded to its longest head (masked filler slots, counted in the reported memory). Evicts at prefill only.
    """
    return method.with_options(head_alpha=alpha, decode_eviction=False)


register_composition("ada-snapkv", "Ada-KV head-wise SnapKV", SnapKV, head_wise=True, decode_eviction=False,
                     color="tab:cyan")
register_composition("ada-cake", "Ada-KV head-wise budgets under CAKE's layer allocation", CAKE, head_wise=True,
                     decode_eviction=False, color="tab:pink")

__all__ = ["AdaKV"]
