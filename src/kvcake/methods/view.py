"""What a scorer or an allocator sees of one layer: its queries and keys, and attention computed lazily from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcake.methods.scoring import NonFiniteAttentionError, WindowStatistics, window_attention, window_statistics


@dataclass
class LayerView:
    """One layer at the end of its prefill.

    Attributes
    ----------
    query : Tensor ``(B, Hq, S, D)``
        Post-RoPE queries of every prompt position.
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
    """

    query: torch.Tensor
    keys: torch.Tensor
    scaling: float
    key_valid: torch.Tensor | None
    softcap: float | None
    layer: int
    num_layers: int
    _windows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _stats: dict[int, WindowStatistics] = field(default_factory=dict, repr=False)

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def seq(self) -> int:
        return self.keys.shape[2]

    def window_attention(self, window: int) -> torch.Tensor:
        """Attention ``(B, Hq, w, S)`` of the last ``w = min(window, S)`` queries, float32, computed once."""
        w = min(window, self.seq)
        if w not in self._windows:
            self._windows[w] = window_attention(self.query[:, :, -w:], self.keys, self.scaling, self.key_valid,
                                                self.softcap)
        return self._windows[w]

    def window_statistics(self, window: int) -> WindowStatistics:
        """CAKE's statistics of the window attention, computed once (shared by CAKE's scorer and allocator)."""
        w = min(window, self.seq)
        if w not in self._stats:
            self._stats[w] = window_statistics(self.window_attention(w))
        return self._stats[w]

    def accumulated_attention(self, block: int | None = None) -> torch.Tensor:
        """Column sums ``(B, Hq, S)`` of the full causal attention of every query (H2O's scores), in query blocks.

        Each block materialises at most about 2^26 float32 logits, so long prompts never need the S x S matrix.
        """
        batch, q_heads, seq, dim = self.query.shape
        kv_heads = self.kv_heads
        groups = q_heads // kv_heads
        if block is None:
            block = max(1, min(seq, (1 << 26) // max(1, batch * q_heads * seq)))
        keys = self.keys.float().transpose(-1, -2)
        total = torch.zeros(batch, q_heads, seq, dtype=torch.float32, device=self.keys.device)
        columns = torch.arange(seq, device=self.keys.device)
        for start in range(0, seq, block):
            stop = min(seq, start + block)
            q = self.query[:, :, start:stop].float()
            n = stop - start
            logits = torch.matmul(q.reshape(batch, kv_heads, groups * n, dim), keys) * self.scaling
            logits = logits.reshape(batch, q_heads, n, seq)
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            if not torch.isfinite(logits).all():
                raise NonFiniteAttentionError("attention logits contain NaN or inf")
            allowed = columns[None, :] <= torch.arange(start, stop, device=columns.device)[:, None]
            allowed = allowed[None, None]
            if self.key_valid is not None:
                row_valid = self.key_valid[:, start:stop].to(allowed.device)
                allowed = allowed & self.key_valid[:, None, None, :] & row_valid[:, None, :, None]
            probs = torch.softmax(logits.masked_fill(~allowed, torch.finfo(torch.float32).min), dim=-1) * allowed
            total += probs.sum(dim=2)
        return total
