"""Storage of one compressed full-attention layer: keys and values per KV head, and the bookkeeping beside them.

Each compressed layer stores keys and values per KV head, ``(batch, kv_heads, length, head_dim)``, and beside them
the original position of every kept entry, ``(batch, kv_heads, length)``. The logical sequence length (what
``generate`` and the mask builders see) is kept apart from each layer's physical length, so positions and RoPE stay
right after eviction. Rows of a batch may keep different numbers of tokens; the shorter rows are padded with
"filler" slots (position -1) that are masked out and counted honestly in the memory figures.

Decode-time eviction drops one entry per head and step. Rather than compacting keys and values (a copy of the whole
layer per step), the dropped entry's slot is left free and the next token is written into it in place, so keys and
values are stored in *slot order* while positions (and kept scores) stay in *position order*; ``order`` maps the
one to the other. Attention does not depend on the order of its keys, so the only per-step costs are index
bookkeeping on ``(batch, kv_heads, length)`` integers and a one-entry write. :meth:`CompressedLayer.entries` gives
keys and values back in position order.

This module decides nothing: which entries to keep comes from the method layer (:mod:`kvcake.methods.budget`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvcake.integration.masks import allowed_columns

FILLER = -1  # position of a slot that only pads a row to the layer's physical length


def flat_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``index`` ``(B, H, K)`` along an axis of ``length`` as indices into the flattened ``(B*H*length)``."""
    batch, heads = index.shape[:2]
    offsets = (torch.arange(batch * heads, device=index.device) * length).view(batch, heads, 1)
    return (index + offsets).reshape(-1)


def take(x: torch.Tensor, index: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(B, H, L, ...)`` taken at ``index`` ``(B, H, K)`` along L -> ``(B, H, K, ...)``.

    One ``index_select`` on the flattened tensor: several times faster on CPU than ``gather`` with an index
    expanded over the feature axis, and it never materialises that expanded index. ``flat`` (from
    :func:`flat_index`) can be passed to reuse it for several tensors of the same shape.
    """
    batch, heads, length = x.shape[:3]
    if flat is None:
        flat = flat_index(index.to(x.device), length)
    rest = x.shape[3:]
    return x.reshape(batch * heads * length, *rest).index_select(0, flat).view(batch, heads, index.shape[-1], *rest)


def base_order(batch: int, heads: int, length: int, device) -> torch.Tensor:
    """The identity slot order ``(B, H, length)``."""
    return torch.arange(length, device=device).expand(batch, heads, length)


def layer_kv_bytes(layer) -> int:
    """Bytes of one cache layer's keys and values (0 while it holds none), free slots included."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None or not keys.numel():
        return 0
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


def cache_kv_bytes(cache) -> int:
    """Bytes of key and value tensors held by any transformers cache, all layers."""
    return sum(layer_kv_bytes(layer) for layer in getattr(cache, "layers", []))


class CompressedLayer(DynamicLayer):
    """One full-attention layer's cache with eviction support.

    Attributes
    ----------
    positions : Tensor ``(B, Hkv, L)`` int64 or None
        Original position of every stored entry; None while the layer is untouched (entry i is at position i).
    seen : int
        Logical number of tokens appended so far.
    valid_counts : list[int] or None
        Per row, how many stored entries are real tokens of that row (host-side, no device sync).
    scores : Tensor ``(B, Hkv, L)`` or None
        Prefill eviction indicator, kept aligned with the entries during the cascade (+inf window, -inf padding).
    order : Tensor ``(B, Hkv, L)`` int64 or None
        Slot of ``keys``/``values`` holding the i-th entry in position order; None while slots are in position order.
        ``positions`` and ``scores`` are always in position order.
    free : Tensor ``(B, Hkv, 1)`` int64 or None
        The slot decode-time eviction freed, which the next token is written into (keys and values then hold one
        slot more than the entries).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None
        self.seen = 0
        self.valid_counts: list[int] | None = None
        self.scores: torch.Tensor | None = None
        self.has_fillers = False  # host-side: some slot is a filler (position -1)
        self.order: torch.Tensor | None = None
        self.free: torch.Tensor | None = None
        self._drop_plan: tuple | None = None

    # -- transformers' layer interface ------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        batch, heads, new = key_states.shape[:3]
        if self.free is not None and new == 1 and self._writable(key_states, value_states):
            keys, values = self._fill_free_slot(key_states, value_states)
        else:
            self.in_position_order()
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.positions is not None:
            if new == 1:
                fresh = self.positions.new_full((batch, heads, 1), self.seen)
            else:
                fresh = torch.arange(self.seen, self.seen + new, device=self.positions.device).expand(batch, heads, new)
            self.positions = torch.cat([self.positions, fresh], dim=-1)
        if self.valid_counts is not None:
            self.valid_counts = [v + new for v in self.valid_counts]
        if self.scores is not None:  # scorers that keep scores (H2O): new entries start at 0
            self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, new)], dim=-1)
        self.seen += new
        return keys, values

    def _writable(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether the new token may be written into the stored tensors in place: no autograd history to break and
        no inference tensor written outside inference mode (else the layer falls back to concatenation)."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return False
        return not (self.keys.is_inference() and not torch.is_inference_mode_enabled())

    def _fill_free_slot(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write one new token into the free slot of every row and head (no copy of the layer); it becomes the last
        entry in position order. The position, count and score bookkeeping is :meth:`update`'s."""
        free, self.free = self.free, None
        slot = free.unsqueeze(-1).expand_as(key_states)
        self.keys.scatter_(2, slot, key_states)
        self.values.scatter_(2, slot if value_states.shape == key_states.shape else
                             free.unsqueeze(-1).expand_as(value_states), value_states)
        self.order = torch.cat([self.order, free], dim=-1)
        return self.keys, self.values

    def in_position_order(self) -> None:
        """Store keys and values in position order again (one copy of the layer; the free slot goes). Every path
        but decoding one token at a time with one eviction per step starts here."""
        if self.order is not None:
            self.keys, self.values, _ = self.entries()
            self.order = self.free = None

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``(B, Hkv, L, D)`` and positions ``(B, Hkv, L)`` of the stored entries in position order
        (fillers, at position -1, first), without changing the layer."""
        if self.order is None:
            return self.keys, self.values, self.position_table()
        flat = flat_index(self.order, self.keys.shape[-2])
        return take(self.keys, self.order, flat), take(self.values, self.order, flat), self.positions

    def to_slots(self, allowed: torch.Tensor | None) -> torch.Tensor | None:
        """A bool mask ``(B, Hkv, q, L)`` over the entries in position order, laid over the slots (the free slot
        masked out)."""
        if allowed is None or self.order is None:
            return allowed
        slots = allowed.new_zeros(*allowed.shape[:-1], self.keys.shape[-2])
        return slots.scatter_(-1, self.order.unsqueeze(2).expand(allowed.shape), allowed)

    def from_slots(self, values: torch.Tensor) -> torch.Tensor:
        """Per-slot values ``(B, H, slots)`` (H a multiple of the KV heads) as per-entry values in position order."""
        if self.order is None:
            return values
        batch, heads, slots = values.shape
        kv_heads, length = self.order.shape[1], self.order.shape[-1]
        groups = heads // kv_heads
        index = self.order.view(batch * kv_heads, 1, length).expand(-1, groups, -1)
        return values.view(batch * kv_heads, groups, slots).gather(-1, index).view(batch, heads, length)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        # transformers >= 5.x passes the query length (int); older 5.x releases pass ``cache_position`` (a tensor
        # of the new tokens' positions), whose length is the query length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        # Drop the tensors (older transformers only zero them in place, keeping their length): update regrows them.
        self.keys = self.values = None
        self.is_initialized = False
        self.positions, self.seen, self.valid_counts, self.scores = None, 0, None, None
        self.has_fillers = False
        self.order = self.free = None

    def crop(self, tokens_to_remove: int) -> None:
        if self.positions is not None:
            raise NotImplementedError("cropping a compressed KV cache (assisted decoding) is not supported by kvcake")
        super().crop(tokens_to_remove)
        self.seen = self.keys.shape[-2] if self.is_initialized else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.in_position_order()
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.in_position_order()
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.in_position_order()
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        if self.valid_counts is not None:
            self.valid_counts = [v for v in self.valid_counts for _ in range(repeats)]

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self.positions is not None:
            self.positions = self.positions[rows.to(self.positions.device)]
        if self.valid_counts is not None:
            self.valid_counts = [self.valid_counts[i] for i in rows.tolist()]

    # -- kvcake ------------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Number of stored entries per head (fillers included, the free slot not)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2] - (self.free is not None)

    def nbytes(self) -> int:
        """Bytes of keys and values held, the free slot included."""
        return layer_kv_bytes(self)

    def spare_bytes(self) -> int:
        """Bytes of the free slot (0 without one)."""
        return 0 if self.free is None else self.nbytes() // self.keys.shape[-2]

    def position_table(self) -> torch.Tensor:
        """Positions of the stored entries, materialised if the layer is untouched."""
        if self.positions is not None:
            return self.positions
        batch, heads, length = self.keys.shape[:3]
        return torch.arange(length, device=self.keys.device).expand(batch, heads, length)

    def keep(self, keep_counts: list[int] | torch.Tensor, scores: torch.Tensor) -> None:
        """Keep, per row (or per row and KV head), the ``keep_counts`` highest-ranked entries.

        ``keep_counts`` is a list with one count per row, or a tensor ``(B, Hkv)`` (head-wise allocation). Ties are
        broken by the earlier position (stable sort), so repeated evictions with the same scores are nested: keeping
        the top k of the top k' (k <= k') equals keeping the top k at once. Kept entries stay in position order;
        heads or rows that keep fewer than the longest are padded in front with filler slots (position -1).
        A layer in slot order is gathered straight from its slots (one copy), and is in position order afterwards.
        """
        length = self.length
        device = self.keys.device
        counts = torch.as_tensor(keep_counts, device=device)
        if counts.dim() == 1:
            counts = counts[:, None].expand(-1, self.keys.shape[1])
        if length == 0 or int(counts.min()) >= length:
            return
        k_max = min(int(counts.max()), length)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k_max]
        positions = self.position_table().gather(-1, order)
        kept = torch.arange(k_max, device=device).view(1, 1, -1) < counts[..., None]
        positions = torch.where(kept, positions, torch.full_like(positions, FILLER))
        positions, perm = torch.sort(positions, dim=-1, stable=True)
        index = order.gather(-1, perm)
        slots = index if self.order is None else self.order.gather(-1, index)
        self.keys, self.values = take(self.keys, slots), take(self.values, slots)
        self.order = self.free = None
        if self.scores is not None:
            self.scores = self.scores.gather(-1, index).masked_fill(positions == FILLER, float("-inf"))
        self.positions = positions
        kept_per_row = counts.clamp_max(length).sum(-1) // counts.shape[1]
        self.valid_counts = [min(int(c), v) for c, v in zip(kept_per_row.tolist(), self.valid_counts, strict=True)]
        self.has_fillers = self.has_fillers or bool((counts < k_max).any())

    def drop_lowest(self, scores: torch.Tensor, window: int) -> None:
        """Drop, in every row and KV head, the lowest-scored entry outside the last ``window`` (decode-time
        eviction's common case). ``scores`` are per entry in position order, like ``positions``.

        An argmin, then bookkeeping on ``(B, Hkv, L)`` integers: the entry's slot becomes the free slot that the
        next token is written into, so keys and values are neither copied nor moved.
        """
        batch, heads, length = scores.shape
        if self.free is not None or self.keys.shape[-2] != length:
            raise RuntimeError("drop_lowest needs a layer whose slots all hold entries")
        lowest = scores[..., : max(1, length - window)].argmin(dim=-1, keepdim=True)  # (B, H, 1)
        base, flat_base, flat_next = self._drop_index(batch, heads, length, scores.device)
        flat = torch.where(base >= lowest, flat_next, flat_base)  # entries after the dropped one move down by one
        order = self.order if self.order is not None else base_order(batch, heads, length, scores.device)
        self.free = order.gather(-1, lowest)
        # torch.take reads the tensors flattened: one operator each, no reshapes.
        self.order = torch.take(order, flat)
        self.positions = torch.take(self.position_table(), flat)
        if self.scores is not None:
            self.scores = torch.take(self.scores, flat)
        self.valid_counts = [v - 1 for v in self.valid_counts]

    def _drop_index(self, batch: int, heads: int, length: int, device):
        """For :meth:`drop_lowest`, cached per shape: ``base`` ``(1, 1, length - 1)`` = 0, 1, ..., length-2, the same
        as flat indices into ``(B, H, length)``, and those plus one: taking the first below the lowest entry and the
        second from it on skips that entry."""
        key = (batch, heads, length, device)
        if self._drop_plan is None or self._drop_plan[0] != key:
            base = torch.arange(length - 1, device=device).view(1, 1, length - 1)
            flat = base + torch.arange(batch * heads, device=device).view(batch, heads, 1) * length
            self._drop_plan = (key, base, flat, flat + 1)
        return self._drop_plan[1:]

    def ranking(self, scores: torch.Tensor, window: int) -> torch.Tensor:
        """``scores`` with the last ``window`` stored entries protected (+inf): what eviction sorts by."""
        ranked = scores.clone()
        ranked[..., max(0, ranked.shape[-1] - window):] = float("inf")
        return ranked

    def layer_mask(self, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
        """Bool mask ``(B, Hkv, q_len, L)`` for the current queries over the stored entries.

        Built from each entry's original position: causal by position, fillers excluded, and the padding columns of
        transformers' own (logical-length) mask taken at the kept positions.
        """
        positions = self.position_table()
        q_pos = torch.arange(self.seen - q_len, self.seen, device=positions.device)
        pos = positions.unsqueeze(2)  # (B, H, 1, L)
        allowed = (pos >= 0) & (pos <= q_pos.view(1, 1, -1, 1))
        logical = allowed_columns(attention_mask, q_len, self.seen)
        if logical is not None:
            logical = logical.to(positions.device)
            batch, heads, length = positions.shape
            index = pos.clamp_min(0).expand(batch, heads, q_len, length)
            allowed &= logical.unsqueeze(1).expand(batch, heads, q_len, logical.shape[-1]).gather(-1, index)
        return allowed


__all__ = ["FILLER", "CompressedLayer", "cache_kv_bytes", "flat_index", "layer_kv_bytes", "take"]
