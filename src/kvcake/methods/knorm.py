"""KNorm: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
(arXiv 2406.11430): keys with a low L2 norm tend to receive high attention, so the score of an entry is minus the
norm of its key, per KV head and position. No query and no attention is read, so the scorer costs one norm per
entry and works with every attention backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvcake._lazy import torch
from kvcake.methods.base import Method, Scorer
from kvcake.methods.cake import CAKE
from kvcake.methods.registry import register, register_composition

if TYPE_CHECKING:
    from kvcake.methods.views import DecodeView, LayerView


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """``-||k||_2`` ``(B, H, L)`` of keys ``(B, H, L, D)``, accumulated in at least float32.

    A norm in bfloat16 would round the scores of distinct entries onto the same value and leave the choice to
    tie-breaking; the keys themselves are not copied to float32.
    """
    dtype = torch.promote_types(keys.dtype, torch.float32)
    return -torch.linalg.vector_norm(keys, dim=-1, dtype=dtype)


@dataclass(frozen=True)
class KNormScores(Scorer):
    """Minus the L2 norm of each key (Devoto et al., 2024, arXiv 2406.11430); higher is kept.

    At prefill, every prompt position of every KV head; at decode time, the same on the stored keys (which the
    engine hands over in position order).
    """

    name: ClassVar[str] = "knorm"

    def prefill(self, view: LayerView, window: int) -> torch.Tensor:
        return key_norm_scores(view.keys)

    def decode(self, view: DecodeView) -> torch.Tensor:
        return key_norm_scores(view.keys)


@register("knorm", about="KNorm: lowest key L2 norm, uniform budgets", color="sienna")
class KNorm(Method):
    """KNorm (Devoto et al., EMNLP 2024, arXiv 2406.11430): the lowest-norm keys, the same budget for every layer.

    The paper (and kvpress's ``KnormPress``) protects no token. kvcake always protects the last ``window`` tokens;
    the default ``window = 1`` is the smallest protection the engine allows, so the kept set differs from the
    paper's only when the newest prompt token is not among the lowest-norm keys (it then replaces the highest-norm
    key that would have been kept). KNorm reads no query, so a longer observation window would only add recency that
    the method does not define. Prefill-only by default (as in the paper); ``decode_eviction=True`` keeps each
    layer at its budget by dropping the highest-norm key outside the window at every step.
    """

    scorer_type = KNormScores
    default_window = 1


register_composition("cake-knorm", "CAKE's allocation with KNorm's key-norm scores", CAKE, scorer=KNormScores,
                     color="darkgoldenrod")

__all__ = ["KNorm", "KNormScores", "key_norm_scores"]
