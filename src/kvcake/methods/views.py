"""What a scorer or an allocator sees of one layer: at the end of its prefill, and at a decoding step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcake._lazy import torch
from kvcake.methods.attention import accumulated_attention, attention_probs, window_attention


@dataclass
class LayerView:
    """One layer at the end of its prefill.

    Attributes
    ----------
    query : Tensor ``(B, Hq, S, D)``
        Post-RoPE queries of the prompt positions (only the last few when the scorer reads only its window).
    keys : Tensor ``(B, Hkv, S, D)``
        Post-RoPE keys, per KV head.
    scaling : float
        The layer's softmax scaling.
    key_valid : bool Tensor ``(B, S)`` or None
        False on padding.
    softcap : float or None
        Logit soft-capping (Gemma-2).
    layer : int
        Index among the compressed layers.
    num_layers : int
        Number of compressed layers.
    values : Tensor ``(B, Hkv, S, Dv)`` or None
        The layer's values (for scorers that weigh entries by their values).
    positions : int Tensor ``(B, S)`` or ``(1, S)``, or None
        The RoPE position of every prompt token (None: ``0 .. S-1``).
    check_finite : bool
        Raise on NaN/inf logits at once (True), or let them turn the scores into NaN for the engine to check once
        per prefill (False, no host synchronisation per layer).
    rotary : callable or None
        ``rotary(positions)`` with positions ``(B, N)`` gives ``(cos, sin)``, each float32 ``(B, N, R)``, of the
        layer's rotary embedding as the model applies it (``x cos + rotate_half(x) sin`` on the first ``R`` dims of
        each head); None when the model has no standard rotary embedding. For scorers that undo or extrapolate RoPE.
    """

    query: torch.Tensor
    keys: torch.Tensor
    scaling: float
    key_valid: torch.Tensor | None
    softcap: float | None
    layer: int
    num_layers: int
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    check_finite: bool = True  # False: NaN/inf logits give NaN scores, which the engine checks once per prefill
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def seq(self) -> int:
        return self.keys.shape[2]

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per view and ``key``: what a scorer and an allocator of the same layer share."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def window_attention(self, window: int) -> torch.Tensor:
        """Attention ``(B, Hq, w, S)`` of the last ``w = min(window, S)`` queries, float32, computed once."""
        w = min(window, self.seq)
        return self.memo(("window", w), lambda: window_attention(self.query[:, :, -w:], self.keys, self.scaling,
                                                                 self.key_valid, self.softcap, self.check_finite))

    def accumulated_attention(self) -> torch.Tensor:
        """Column sums ``(B, Hq, S)`` of the causal attention of every prompt query (H2O), computed once."""
        return self.memo("accumulated", lambda: accumulated_attention(self.query, self.keys, self.scaling,
                                                                      self.key_valid, self.softcap,
                                                                      check=self.check_finite))

    def with_window(self, scores: torch.Tensor) -> torch.Tensor:
        """Non-window scores ``(B, H, N)`` padded to the prompt length with +inf (the window is always kept)."""
        batch, heads, n = scores.shape
        return torch.cat([scores, scores.new_full((batch, heads, self.seq - n), float("inf"))], dim=-1)


@dataclass
class DecodeView:
    """One layer at a decoding step, after the new entry was stored: every per-entry tensor is in *position order*
    (the order of the entries' original positions), whatever order the cache stores them in.

    Attributes
    ----------
    query : Tensor ``(B, Hq, 1, D)`` or None
        The newest query (None where an engine scores the rows of several layers in one call, for scorers with
        ``decode_from_probs``: ``probs`` is then given).
    scaling, softcap
        The layer's softmax scaling and soft-capping.
    positions : Tensor ``(B, Hkv, L)`` int64 or None
        Original position of each entry (-1 for a slot that holds no token). None where an engine scores for a
        scorer with ``decode_from_probs``, which does not read them (``heads`` then says how many KV heads).
    allowed : bool Tensor ``(B, Hkv, L)`` or None
        Entries the query may attend to (None: all).
    stored : Tensor ``(B, Hkv, L)`` or None
        The scores kept beside the entries by scorers that keep them (new entries start at 0).
    probs : Tensor ``(B, Hq, L)`` or None
        The query's attention over the entries when the engine computed it already.
    window : int
        The method's window: the last ``window`` entries are never dropped.
    heads : int or None
        KV heads, where ``positions`` is None.
    """

    query: torch.Tensor | None
    scaling: float
    softcap: float | None
    positions: torch.Tensor | None
    allowed: torch.Tensor | None
    stored: torch.Tensor | None
    probs: torch.Tensor | None = None
    window: int = 0
    read_keys: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    read_values: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    heads: int | None = None

    @property
    def kv_heads(self) -> int:
        if self.positions is None:
            assert self.heads is not None, "a view without positions says how many KV heads it has"
            return self.heads
        return self.positions.shape[1]

    @property
    def keys(self) -> torch.Tensor:
        """Keys ``(B, Hkv, L, D)`` in position order (gathered on demand: most scorers never read them)."""
        if self.read_keys is None:
            raise RuntimeError("this decoding step exposes no keys")
        return self.read_keys()

    @property
    def values(self) -> torch.Tensor:
        """Values ``(B, Hkv, L, Dv)`` in position order (gathered on demand)."""
        if self.read_values is None:
            raise RuntimeError("this decoding step exposes no values")
        return self.read_values()

    def attention(self) -> torch.Tensor:
        """Attention ``(B, Hq, L)`` of the newest query over the entries (given, or computed here)."""
        if self.probs is None:
            assert self.query is not None, "a view without its query carries its attention"
            allowed = None if self.allowed is None else self.allowed[:, :, None, None, :]
            self.probs = attention_probs(self.query[:, :, -1:], self.keys, self.scaling, allowed, self.softcap,
                                         check=False)[:, :, 0]
        return self.probs


__all__ = ["DecodeView", "LayerView"]
