"""Storage of one compressed full-attention layer: keys and values per KV head, and the bookkeeping beside them.

Two layouts:

* **During prefill** (and when several tokens are fed at once after it) the layer is a growing
  ``(batch, kv_heads, length, head_dim)`` tensor pair in position order, with the original position of every kept
  entry beside it, ``(batch, kv_heads, length)``. Rows of a batch may keep different numbers of tokens; the shorter
  rows are padded in front with "filler" slots (position -1) that are masked out and counted in the memory figures.
  The cascade's evictions compact it (:meth:`CompressedLayer.keep`).
* **While decoding one token at a time** the layer is frozen into fixed-shape buffers (:class:`Slots`): every table
  is a device tensor updated in place, so a decoding step has no host synchronisation and no changing shape, and can
  be compiled and run under CUDA graphs.

The logical sequence length (what ``generate`` and RoPE see) is kept apart from each layer's physical length, so
positions stay right after eviction. This module decides nothing: which entries to keep comes from the method layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvcake.engines.transformers.masks import allowed_columns
from kvcake.engines.transformers.slots import Slots

FILLER = -1  # position of a slot that only pads a row to the layer's physical length, or of a free slot


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, L, ...)`` taken at ``index`` ``(B, H, K)`` along L -> ``(B, H, K, ...)``.

    One ``index_select`` on the flattened tensor: several times faster on CPU than ``gather`` with an index expanded
    over the feature axis, and it never materialises that expanded index.
    """
    batch, heads, length = x.shape[:3]
    offsets = (torch.arange(batch * heads, device=x.device) * length).view(batch, heads, 1)
    flat = (index.to(x.device) + offsets).reshape(-1)
    rest = x.shape[3:]
    return x.reshape(batch * heads * length, *rest).index_select(0, flat).view(batch, heads, index.shape[-1], *rest)


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
        Prefill layout: original position of every stored entry; None while the layer is untouched.
    appended : int
        Tokens appended to the layer so far, evicted ones included: its logical length, kept on the host outside
        compiled code (see :meth:`logical_length`).
    valid_counts : list[int] or None
        Prefill layout: per row, how many stored entries are real tokens of that row.
    scores : Tensor ``(B, Hkv, L)`` or None
        Prefill layout: the eviction indicator, kept aligned with the entries during the cascade (+inf window,
        -inf padding).
    slots : Slots or None
        Decoding layout (fixed shapes); None in the prefill layout.
    """

    is_compileable = True  # decodes in fixed-shape slots after prefill

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None
        self.appended = 0
        self.valid_counts: list[int] | None = None
        self.scores: torch.Tensor | None = None
        self.has_fillers = False  # host-side: some slot is a filler (position -1)
        self.slots: Slots | None = None
        self._spare: Slots | None = None  # the previous request's buffers, reused when their shapes fit

    # -- transformers' layer interface ------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[2]
        if self.slots is not None:
            if new == 1:
                self.slots.writable()
                self.slots.write(key_states, value_states)
                if not torch.compiler.is_compiling():
                    self.appended += 1
                return self.slots.keys, self.slots.values
            self.thaw()
        batch, heads = key_states.shape[:2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.positions is not None:
            fresh = torch.arange(self.appended, self.appended + new, device=self.positions.device).expand(
                batch, heads, new)
            self.positions = torch.cat([self.positions, fresh], dim=-1)
        if self.valid_counts is not None:
            self.valid_counts = [v + new for v in self.valid_counts]
        if self.scores is not None:  # scorers that keep scores (H2O): new entries start at 0
            self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, new)], dim=-1)
        self.appended += new
        return keys, values

    def get_seq_length(self):
        if self.slots is not None and torch.compiler.is_compiling():
            return self.slots.cursor
        return self.appended

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        # transformers >= 5.x passes the query length (int); older 5.x releases pass ``cache_position`` (a tensor
        # of the new tokens' positions), whose length is the query length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        if self.slots is not None and query_length == 1:
            # A decoding step of a frozen layer builds its own mask from its slots: transformers' mask goes unused,
            # and a constant size keeps it from changing shape (and a compiled step from recompiling) as the
            # sequence grows. Several tokens (a chat's next turn) thaw the layer and need the logical mask.
            return 1, 0
        return self.logical_length() + query_length, 0

    def reset(self) -> None:
        super().reset()
        # Drop the tensors (older transformers only zero them in place, keeping their length): update regrows them.
        self.keys = self.values = None
        self.is_initialized = False
        self.positions, self.appended, self.valid_counts, self.scores = None, 0, None, None
        self.has_fillers = False
        if self.slots is not None:
            self._spare = self.slots
        self.slots = None

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest ``-tokens_to_remove`` tokens (a count <= 0, transformers' convention): the entries at
        those positions, which are the newest of every row and head as long as nothing was evicted after them (the
        cache checks that the method evicts nothing while decoding)."""
        count = -tokens_to_remove
        if count <= 0 or not self.is_initialized:
            return
        keep = self.logical_length() - count
        if self.slots is not None:
            self.slots.forget_from(keep)
            self.appended = keep
            return
        if self.positions is not None:
            if not bool((self.positions[..., -count:] >= keep).all()):
                raise ValueError(f"the newest {count} entries of the layer are not its last {count} tokens")
            self.positions = self.positions[..., :-count]
            if self.valid_counts is not None:
                self.valid_counts = [v - count for v in self.valid_counts]
        super().crop(tokens_to_remove)
        if self.scores is not None:
            self.scores = self.scores[..., :-count]
        self.appended = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.slots is not None:
            self.slots.select_rows(beam_idx)  # in place: the buffers keep their addresses
            return
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.thaw()
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.thaw()
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        if self.valid_counts is not None:
            self.valid_counts = [v for v in self.valid_counts for _ in range(repeats)]

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self.positions is not None:
            self.positions = self.positions[rows.to(self.positions.device)]
        if self.scores is not None:
            self.scores = self.scores[rows.to(self.scores.device)]
        if self.valid_counts is not None:
            self.valid_counts = [self.valid_counts[i] for i in rows.tolist()]

    # -- the decoding layout -------------------------------------------------------------------------------------------
    def freeze(self, capacity: int, targets: list[list[int]] | None, start: int, max_drops: int,
               keep_scores: bool, prompt_valid: torch.Tensor | None = None) -> None:
        """Move the entries into fixed-shape buffers of ``capacity`` slots (see :class:`Slots`).

        ``prompt_valid`` ``(B, S)`` marks the prompt's padding (False): padding entries a layer still holds become
        free slots, since no query ever attends to them.
        """
        if self.slots is not None or not self.is_initialized or self.keys is None or self.values is None:
            return
        positions = self.position_table()
        if prompt_valid is not None:
            batch, heads, length = positions.shape
            inside = (positions >= 0) & (positions < prompt_valid.shape[1])
            where = positions.clamp(0, prompt_valid.shape[1] - 1).reshape(batch, -1)
            real = prompt_valid.to(positions.device).gather(1, where).view(batch, heads, length)
            positions = positions.masked_fill(inside & ~real, FILLER)
        scores = self.scores if keep_scores else None
        self.slots = Slots.build(self.keys, self.values, positions, scores, capacity, self.appended, targets,
                                 start, max_drops, reuse=self._spare)
        self._spare = None
        self.keys, self.values = self.slots.keys, self.slots.values
        self.positions, self.valid_counts, self.scores = None, None, None

    def thaw(self) -> None:
        """Back to the prefill layout (position order, trimmed to the longest row), e.g. to feed several tokens."""
        if self.slots is None:
            return
        slots, self.slots = self.slots, None
        counts = slots.count.tolist()
        longest = max(max(row) for row in counts)
        keys, values, positions = slots.entries()
        self.keys, self.values = keys[:, :, -longest:].clone(), values[:, :, -longest:].clone()
        self.positions = positions[..., -longest:].clone()
        self.scores = None
        if slots.stored is not None:
            self.scores = slots.stored.gather(-1, slots.order())[..., -longest:].masked_fill(self.positions < 0,
                                                                                            float("-inf"))
        self.valid_counts = [row[0] for row in counts]
        self.has_fillers = any(c < longest for row in counts for c in row)
        self.appended = int(slots.cursor)

    # -- kvcake ------------------------------------------------------------------------------------------------------
    def awaits_prefill(self, q_len: int) -> bool:
        """Whether a feed of ``q_len`` tokens is the layer's prefill: it holds just those tokens, unscored."""
        return self.appended == q_len and self.positions is None and self.valid_counts is None

    def logical_length(self) -> int:
        """Tokens appended so far (read from the device cursor while decoding: it is exact after compiled steps)."""
        return int(self.slots.cursor) if self.slots is not None else self.appended

    @property
    def length(self) -> int:
        """Stored entries per head of the longest row and head (fillers included, free decoding slots not)."""
        if self.slots is not None:
            return int(self.slots.count.max())
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    def kept_per_row(self, rows: int) -> list[int]:
        """Real tokens each of the ``rows`` rows holds now."""
        if self.slots is not None:
            return [int(c) for c in self.slots.count.max(dim=-1).values]
        return list(self.valid_counts) if self.valid_counts is not None else [self.length] * rows

    def nbytes(self) -> int:
        """Bytes of keys and values held, free slots included."""
        return layer_kv_bytes(self)

    def nbytes_full(self) -> int:
        """Bytes of keys and values the layer would hold without eviction: every token appended, every row."""
        if self.keys is None or self.values is None:
            return 0
        batch, heads, _, k_dim = self.keys.shape
        per_token = k_dim * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        return batch * heads * self.logical_length() * per_token

    def metadata_bytes(self) -> int:
        """Bytes of kvcake's own bookkeeping beside the entries (kept positions; while decoding, the slot tables)."""
        slots = self.slots
        tables = (self.positions,) if slots is None else (slots.positions, slots.count, slots.stored, slots.targets)
        return sum(t.numel() * t.element_size() for t in tables if t is not None)

    def slot_bytes(self) -> int:
        """Bytes of one slot (one entry of every row and head)."""
        keys = self.keys
        return 0 if keys is None or keys.shape[-2] == 0 else self.nbytes() // keys.shape[-2]

    def spare_bytes(self) -> int:
        """Bytes of the decoding slots that hold no entry of any row: the slot the next token goes to, and room
        reserved for the tokens still to be generated."""
        if self.slots is None:
            return 0
        return (self.slots.capacity - self.length) * self.slot_bytes()

    def padding_bytes(self) -> int:
        """Bytes of filler slots: rows (or heads) keeping fewer entries than the longest."""
        if self.slots is not None:
            short = self.length - self.slots.count
            return int(short.sum()) * self.slot_bytes() // max(short.numel(), 1)
        if self.positions is None:
            return 0
        return int((self.positions < 0).sum()) * self.nbytes() // max(self.positions.numel(), 1)

    def position_table(self) -> torch.Tensor:
        """Positions ``(B, Hkv, L)`` of the stored entries in position order (fillers first), materialised if the
        layer is untouched; while decoding, trimmed to the longest row and head."""
        if self.slots is not None:
            return self.slots.entries()[2][..., -self.length:]
        if self.positions is not None:
            return self.positions
        assert self.keys is not None
        batch, heads, length = self.keys.shape[:3]
        return torch.arange(length, device=self.keys.device).expand(batch, heads, length)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``(B, Hkv, L, D)`` and positions ``(B, Hkv, L)`` of the stored entries in position order
        (fillers, at position -1, first), without changing the layer."""
        if self.slots is not None:
            keys, values, positions = self.slots.entries()
            n = self.length
            return keys[:, :, -n:], values[:, :, -n:], positions[..., -n:]
        assert self.keys is not None and self.values is not None
        return self.keys, self.values, self.position_table()

    def keep(self, keep_counts: list[int] | torch.Tensor, scores: torch.Tensor) -> None:
        """Keep, per row (or per row and KV head), the ``keep_counts`` highest-ranked entries (prefill layout).

        ``keep_counts`` is a list with one count per row, or a tensor ``(B, Hkv)`` (head-wise allocation). Ties are
        broken by the earlier position (stable sort), so repeated evictions with the same scores are nested: keeping
        the top k of the top k' (k <= k') equals keeping the top k at once. Kept entries stay in position order;
        heads or rows that keep fewer than the longest are padded in front with filler slots (position -1).
        """
        assert self.keys is not None and self.values is not None and self.valid_counts is not None
        length = self.length
        device = self.keys.device
        heads = self.keys.shape[1]
        if isinstance(keep_counts, list):  # one count per row, known on the host: no synchronisation
            low, high = min(keep_counts), max(keep_counts)
            counts = torch.tensor(keep_counts, device=device)[:, None].expand(-1, heads)
            per_row = [min(c, length) for c in keep_counts]
        else:  # head-wise counts (B, Hkv), computed on the device
            counts = keep_counts.to(device)
            low, high = int(counts.min()), int(counts.max())
            per_row = (counts.clamp_max(length).sum(-1) // heads).tolist()
        if length == 0 or low >= length:
            return
        k_max = min(high, length)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k_max]
        positions = self.position_table().gather(-1, order)
        kept = torch.arange(k_max, device=device).view(1, 1, -1) < counts[..., None]
        positions = torch.where(kept, positions, torch.full_like(positions, FILLER))
        positions, perm = torch.sort(positions, dim=-1, stable=True)
        index = order.gather(-1, perm)
        self.keys, self.values = take(self.keys, index), take(self.values, index)
        if self.scores is not None:
            self.scores = self.scores.gather(-1, index).masked_fill(positions == FILLER, float("-inf"))
        self.positions = positions
        self.valid_counts = [min(int(c), v) for c, v in zip(per_row, self.valid_counts, strict=True)]
        self.has_fillers = self.has_fillers or low < k_max

    def ranking(self, scores: torch.Tensor, window: int) -> torch.Tensor:
        """``scores`` with the last ``window`` stored entries protected (+inf): what eviction sorts by."""
        ranked = scores.clone()
        ranked[..., max(0, ranked.shape[-1] - window):] = float("inf")
        return ranked

    def layer_mask(self, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
        """Bool mask ``(B, Hkv, q_len, L)`` for the current queries over the stored entries (prefill layout).

        Built from each entry's original position: causal by position, fillers excluded, and the padding columns of
        transformers' own (logical-length) mask taken at the kept positions.
        """
        positions = self.position_table()
        q_pos = torch.arange(self.appended - q_len, self.appended, device=positions.device)
        pos = positions.unsqueeze(2)  # (B, H, 1, L)
        allowed = (pos >= 0) & (pos <= q_pos.view(1, 1, -1, 1))
        logical = allowed_columns(attention_mask, q_len, self.appended)
        if logical is not None:
            logical = logical.to(positions.device)
            batch, heads, length = positions.shape
            index = pos.clamp_min(0).expand(batch, heads, q_len, length)
            allowed &= logical.unsqueeze(1).expand(batch, heads, q_len, logical.shape[-1]).gather(-1, index)
        return allowed


__all__ = ["FILLER", "CompressedLayer", "cache_kv_bytes", "layer_kv_bytes", "take"]
