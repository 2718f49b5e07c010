"""The fixed-shape state of a compressed layer while it decodes one token at a time.

After prefill every compressed layer keeps a constant size while decoding (CAKE §3.4), which is what makes decoding
compilable: the layer's entries move into buffers allocated once at their final size ``C`` — the most entries the
layer will hold, plus the slot the next token is written into — and every table beside them is a device tensor of
fixed shape updated in place (StaticLayer's pattern in transformers):

* ``keys``, ``values`` ``(B, Hkv, C, D)``: the entries, in *slot order* (a new token goes to a free slot);
* ``positions`` ``(B, Hkv, C)`` int64: each slot's original position, -1 for a free slot;
* ``count`` ``(B, Hkv)``: tokens held; ``cursor`` ``()``: the logical length;
* ``stored`` ``(B, Hkv, C)``: the scores kept beside the entries by scorers that keep them (H2O);
* ``targets`` ``(S + 1, B)``: the layer's decode schedule (entries allowed once ``s`` tokens were generated).

A step writes the new token into the first free slot, attends over all ``C`` slots with the free ones masked, and
frees the slots decode-time eviction drops: no host synchronisation, no tensor that grows, no data-dependent shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcake.engines.transformers import ops  # noqa: F401 (defines torch.ops.kvcake)


def static_buffers(*tensors: torch.Tensor | None, axis: int | None = 2) -> None:
    """Tell torch.compile these buffers keep their address (CUDA graphs read them in place), and that their axis
    ``axis`` (the slot axis, or a decode schedule's steps; for the tensors that have it: more than ``axis``
    dimensions, or at least ``-axis``; None: none) may differ from one request to the next: layers get budgets that
    depend on the prompt, schedules lengths that depend on the answer's, and a compiled step that specialised on them
    would recompile for every new request."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t)
            if axis is not None and (t.dim() > axis if axis >= 0 else t.dim() >= -axis):
                torch._dynamo.mark_dynamic(t, axis % t.dim())


def schedule_row(cursor: torch.Tensor, start: torch.Tensor, rows: int) -> torch.Tensor:
    """The row ``(1,)`` of a decode schedule of ``rows`` rows that a step at logical length ``cursor`` reads, the
    schedule starting at ``start`` (its last row holds after the schedule's end)."""
    return (cursor - start).clamp(0, rows - 1).view(1)


@dataclass
class Slots:
    """The buffers and tables of one layer (see the module docstring)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    count: torch.Tensor
    cursor: torch.Tensor
    stored: torch.Tensor | None
    targets: torch.Tensor | None  # None: the layer evicts nothing while decoding
    start: torch.Tensor  # () logical length when the schedule starts (a tensor: it changes from request to request)
    max_drops: int  # the most entries a step drops (a host constant of the schedule)
    overflow: torch.Tensor  # () a token came with no free slot (more tokens than the buffers were sized for)
    #: ``(B, Hkv)`` the slot the next token goes to, where a :class:`~kvcake.engines.transformers.group.LayerGroup`
    #: chooses it (and checks for overflow); None: the first free slot.
    next_slot: torch.Tensor | None = None

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor | None,
              capacity: int, cursor: int, targets: list[list[int]] | None, start: int, max_drops: int,
              reuse: Slots | None = None) -> Slots:
        """Buffers of ``capacity`` slots holding the given entries (position order, fillers at -1) first.

        ``reuse``: the buffers of the layer's previous request; when they have the same shapes they are filled in
        place, so that their addresses stay the same from request to request (a captured CUDA graph or a compiled
        step keeps working without recompiling).
        """
        batch, heads, length = positions.shape
        if capacity <= length:
            raise ValueError(f"capacity {capacity} leaves no free slot for {length} entries")
        device = keys.device
        table = None if targets is None else torch.tensor(targets, dtype=torch.long, device=device)
        if reuse is not None and reuse._fits(keys, values, scores, capacity, table):
            reuse._fill(keys, values, positions, scores, cursor, table, start, max_drops)
            return reuse
        k = keys.new_zeros(batch, heads, capacity, keys.shape[-1])
        v = values.new_zeros(batch, heads, capacity, values.shape[-1])
        k[:, :, :length] = keys
        v[:, :, :length] = values
        pos = positions.new_full((batch, heads, capacity), -1)
        pos[..., :length] = positions
        stored = None
        if scores is not None:
            stored = scores.new_zeros(batch, heads, capacity)
            stored[..., :length] = scores
        slots = cls(k, v, pos, (pos >= 0).sum(-1), torch.tensor(cursor, dtype=torch.long, device=device), stored,
                    table, torch.tensor(start, dtype=torch.long, device=device), max_drops,
                    torch.zeros((), dtype=torch.bool, device=device))
        slots._static()
        return slots

    def _fits(self, keys, values, scores, capacity: int, table) -> bool:
        same = (self.keys.shape == (*keys.shape[:2], capacity, keys.shape[-1]) and self.keys.dtype == keys.dtype
                and self.values.shape[-1] == values.shape[-1] and self.values.dtype == values.dtype
                and self.keys.device == keys.device and (self.stored is None) == (scores is None)
                and (self.targets is None) == (table is None))
        return same and (table is None or self.targets is None or self.targets.shape == table.shape)

    def _fill(self, keys, values, positions, scores, cursor: int, table, start: int, max_drops: int) -> None:
        length = positions.shape[-1]
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.positions.fill_(-1)
        self.positions[..., :length] = positions
        self.count.copy_((self.positions >= 0).sum(-1))
        self.cursor.fill_(cursor)
        if self.stored is not None and scores is not None:
            self.stored.zero_()
            self.stored[..., :length] = scores
        if self.targets is not None and table is not None:
            self.targets.copy_(table)
        self.start.fill_(start)
        self.overflow.zero_()
        self.max_drops = max_drops
        self.next_slot = None

    @property
    def capacity(self) -> int:
        return self.positions.shape[-1]

    def writable(self) -> None:
        """Buffers made under ``torch.inference_mode`` cannot be written outside it: copy them once if so."""
        if torch.compiler.is_compiling():
            return  # compiled steps write the buffers made before compiling
        if self.keys.is_inference() and not torch.is_inference_mode_enabled():
            for name in ("keys", "values", "positions", "count", "cursor", "stored", "targets", "start", "overflow"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.clone())
            self._static()

    def _static(self) -> None:
        static_buffers(self.keys, self.values, self.positions, self.count, self.cursor, self.stored, self.start,
                       self.overflow)
        static_buffers(self.targets, axis=0)  # the schedule's steps: as many as the answer's tokens

    def write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one new token per row and head ``(B, Hkv, 1, D)`` in the first free slot (or the slot the layer's
        group chose: :attr:`next_slot`), at the logical cursor: the operator ``kvcake::slot_write``
        (:mod:`kvcake.engines.transformers.ops`), which a compiled step calls rather than traces."""
        torch.ops.kvcake.slot_write(key, value, self.keys, self.values, self.positions, self.count, self.cursor,
                                    self.overflow, self.stored, self.next_slot)

    def forget_from(self, position: int) -> None:
        """Free the slots of the tokens at ``position`` and after, and move the logical cursor back to it."""
        dropped = self.positions >= position
        self.positions.masked_fill_(dropped, -1)
        self.count.sub_(dropped.sum(dim=-1))
        self.cursor.fill_(position)

    def order(self) -> torch.Tensor:
        """Slots ``(B, Hkv, C)`` by increasing position: free slots (-1) first, then the tokens."""
        return torch.sort(self.positions, dim=-1, stable=True).indices

    def schedule_step(self) -> torch.Tensor:
        """The row ``(1,)`` of the decode schedule this step reads (:func:`schedule_row`)."""
        assert self.targets is not None
        return schedule_row(self.cursor, self.start, self.targets.shape[0])

    def target(self, step: torch.Tensor | None = None) -> torch.Tensor:
        """Entries allowed per row ``(B, 1)`` at this step; ``step``: :meth:`schedule_step`, when already known (the
        layers of one step share it)."""
        assert self.targets is not None
        return self.targets.index_select(0, self.schedule_step() if step is None else step).view(-1, 1)

    def drop_one(self, slot: torch.Tensor, chosen: torch.Tensor) -> None:
        """Free slot ``slot`` ``(B, Hkv, 1)`` of each row and head where ``chosen`` ``(B, Hkv, 1)``."""
        self.positions.scatter_(-1, slot, self.positions.gather(-1, slot).masked_fill(chosen, -1))
        self.count.sub_(chosen.view(self.count.shape).to(self.count.dtype))

    def drop(self, dropped: torch.Tensor) -> None:
        """Free the slots marked in ``dropped`` ``(B, Hkv, C)``."""
        self.positions.masked_fill_(dropped, -1)
        self.count.sub_(dropped.sum(dim=-1))

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``(B, Hkv, C, D)`` and positions ``(B, Hkv, C)`` in position order (free slots first)."""
        order = self.order()
        take = order.unsqueeze(-1)
        return (self.keys.gather(2, take.expand_as(self.keys)), self.values.gather(2, take.expand_as(self.values)),
                self.positions.gather(-1, order))

    def select_rows(self, rows: torch.Tensor) -> None:
        """Follow a reordering of the batch (beam search), in place so that buffer addresses stay."""
        for name in ("keys", "values", "positions", "count", "stored"):
            value = getattr(self, name)
            if value is not None:
                value.copy_(value.index_select(0, rows.to(value.device)))
        if self.targets is not None:
            self.targets.copy_(self.targets.index_select(1, rows.to(self.targets.device)))


__all__ = ["Slots", "schedule_row", "static_buffers"]
