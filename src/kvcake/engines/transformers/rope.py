"""The rotary position embedding of an attention layer, for scorers that must undo or extrapolate RoPE.

The attention wrapper only sees post-RoPE queries and keys. A scorer that needs the queries *before* RoPE, or the
rotation at positions the model has not reached yet (Expected Attention), asks :class:`Rotary` for the ``cos`` and
``sin`` tables the model uses. They come from a private instance of the model's own rotary-embedding class, built
from the layer's configuration: every RoPE variant transformers implements (default, linear, dynamic NTK, YaRN,
LongRoPE, Llama-3, per-layer-type tables as in Gemma-3) is computed by the model's own code, and the model's own
rotary module (whose dynamic variants keep state) is never called.
"""

from __future__ import annotations

import inspect
import sys

import torch


def rotary_class(module: torch.nn.Module) -> type | None:
    """The rotary-embedding class defined next to ``module``'s class (``LlamaRotaryEmbedding`` for Llama), or None."""
    namespace = vars(sys.modules.get(type(module).__module__, object()))
    found = [obj for name, obj in namespace.items()
             if name.endswith("RotaryEmbedding") and isinstance(obj, type) and issubclass(obj, torch.nn.Module)]
    # Prefer the model's text rotary embedding over variants (e.g. multimodal ones) defined in the same file.
    found.sort(key=lambda cls: (len(cls.__name__), cls.__name__))
    return found[0] if found else None


class Rotary:
    """``cos``/``sin`` of one attention layer's RoPE at any integer positions, computed lazily.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (its ``config`` and ``layer_idx`` select the table).

    Calling it with positions ``(B, N)`` returns ``(cos, sin)``, each float32 ``(B, N, R)``: the tables the model
    multiplies the first ``R`` dimensions of each head by (``x cos + rotate_half(x) sin``), attention scaling of
    YaRN/LongRoPE included.
    """

    def __init__(self, module: torch.nn.Module):
        self._config = getattr(module, "config", None)
        self._layer_idx = getattr(module, "layer_idx", None)
        self._cls = rotary_class(module)
        self._embedding: torch.nn.Module | None = None
        self._layer_type: str | None = None

    @property
    def available(self) -> bool:
        return self._cls is not None and self._config is not None

    def _build(self) -> torch.nn.Module:
        if self._embedding is None:
            if not self.available:
                raise TypeError("this model has no standard rotary embedding (no *RotaryEmbedding class next to its "
                                "attention module)")
            embedding = self._cls(self._config)  # type: ignore[misc]
            if "layer_type" in inspect.signature(embedding.forward).parameters:
                layer_types = getattr(self._config, "layer_types", None)
                if layer_types is None or self._layer_idx is None:
                    raise TypeError(f"{type(embedding).__name__} needs a layer type, and the config names none")
                self._layer_type = layer_types[self._layer_idx]
            self._embedding = embedding
        return self._embedding

    @torch.no_grad()
    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self._build()
        positions = positions.long()
        like = torch.empty(0, dtype=torch.float32, device=positions.device)
        embedding.to(positions.device)
        extra = {} if self._layer_type is None else {"layer_type": self._layer_type}
        cos, sin = embedding(like, positions, **extra)
        return cos.float(), sin.float()


def rotary_for(module: torch.nn.Module) -> Rotary | None:
    """A lazy :class:`Rotary` for ``module``, or None when the model defines no standard rotary embedding."""
    rotary = Rotary(module)
    return rotary if rotary.available else None
