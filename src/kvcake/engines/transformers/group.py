"""Decode-time eviction of every evicting layer of a decoding step in one batch (see :class:`LayerGroup`)."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from kvcake.engines.transformers.slots import Slots, static_buffers
from kvcake.engines.transformers.storage import CompressedLayer
from kvcake.methods.base import Method
from kvcake.methods.decoding import lowest_candidate
from kvcake.methods.views import DecodeView


class LayerGroup:
    """Decode-time eviction of every evicting layer of a step, scored and chosen in one batch after the last of them
    attended.

    At a decoding step a layer's eviction reads nothing but that layer's attention probabilities and slot positions,
    and nothing reads the layer again before the next step, so choosing its dropped entry after the last layer
    attended leaves the same cache as choosing it at once. Batched, the scoring, pooling, arg-min and target check
    are one set of operators for all the layers rather than one per layer (five compute operators per layer remain:
    padding its probabilities and positions into the batch, its target, freeing its slot), which is most of what
    decode-time eviction costs eagerly.

    The layers' slot axes differ (their capacities do): each layer's probabilities and positions are padded at the
    end of the slot axis with zero-probability entries at position ``PADDING``, which sort before the free slots
    (-1), so in position order every row is padding, free slots, tokens, as a scorer with ``decode_from_probs``
    expects; zero probabilities pool like the zero padding a layer's own row has at its edges, so the scores are the
    same.

    The position order of the slots (their stable sort by position, what a layer on its own sorts at every step) is
    kept from step to step instead of sorted anew: a step's write takes the first free slot, which is the first after
    the padding in that order, and gives it the largest position, so it moves to the end; the dropped slot moves
    from its place among the tokens to its place among the free slots by slot index. Both are one gather each for
    all the layers. Anything else that moves entries (a crop, beam search) calls :meth:`resort`.

    Used where every evicting layer drops at most one entry per step and the method's scorer has
    ``decode_from_probs`` and keeps no scores (:meth:`split`, which also keeps layers of very different capacities
    apart); otherwise each layer evicts in its own call.
    """

    PADDING = -2
    #: The largest ratio of capacities within one group (see :meth:`split`); None: one group. On SmolLM2 at 8K
    #: (capacities 43 to 2,245) one group decoded faster than 3 to 6 groups by capacity (102.8 ms a step against
    #: 119.8-123.6; `benchmarks/group_spread.py`, one run): each group costs its own 43 operators a step, more than
    #: scoring the padding costs at these sizes.
    SPREAD: float | None = None

    def __init__(self, members: list[int], layers: list[CompressedLayer]) -> None:
        self.members = members  # cache layer indices, in the order the model calls them
        self.layers = layers
        self._index = {layer_idx: n for n, layer_idx in enumerate(members)}
        self._probs: list[torch.Tensor | None] = [None] * len(members)
        slots = self._slots()
        device, capacity = slots[0].positions.device, max(s.capacity for s in slots)
        padding = torch.tensor([capacity - s.capacity for s in slots], device=device).view(-1, 1, 1, 1)
        index = torch.arange(capacity, device=device).view(1, 1, 1, -1)
        #: (N, 1, 1, 1) padding entries of each layer, first in position order.
        self.padding = padding
        #: (1, 1, 1, C) the entry indices.
        self.index = index
        #: (N, 1, 1, C) the order after a write: the first slot after the padding moves to the end.
        self.after_write = torch.where(index == capacity - 1, padding,
                                       torch.where(index < padding, index, index + 1))
        #: (N, B, H, C) the slots of every layer in position order (padding, free slots, tokens).
        self.order = torch.sort(self._positions(slots), dim=-1, stable=True).indices
        static_buffers(self.index, self.after_write, self.order, axis=-1)

    @classmethod
    def split(cls, method: Method, layers: dict[int, CompressedLayer], spread: float | None) -> list[LayerGroup]:
        """The groups of the frozen layers that evict while decoding (none where they cannot be batched).

        Layers are padded to the largest capacity of their group, so with budgets as uneven as CAKE's (one layer
        may hold 60 times what another does) one group would score mostly padding. ``spread`` bounds the ratio of
        the largest capacity to the smallest within a group: layers sorted by capacity are grouped greedily.
        None makes one group of them all, whatever their budgets: what compiled decoding needs, since which layers
        go together is part of the compiled step and must not change from one request to the next.
        """
        evicting = {i: layer.slots for i, layer in layers.items()
                    if layer.slots is not None and layer.slots.targets is not None}
        tables = {s.targets.shape for s in evicting.values() if s.targets is not None}
        if (not evicting or not method.scorer.decode_from_probs or method.scorer.keeps_scores
                or len(tables) != 1 or any(s.max_drops > 1 or s.capacity <= method.window for s in evicting.values())):
            return []
        buckets: list[list[int]] = []
        for i in sorted(evicting, key=lambda i: evicting[i].capacity):
            if buckets and (spread is None or evicting[i].capacity <= spread * evicting[buckets[-1][0]].capacity):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        return [cls(sorted(bucket), [layers[i] for i in sorted(bucket)]) for bucket in buckets]

    def _slots(self) -> list[Slots]:
        slots = [layer.slots for layer in self.layers]
        assert all(s is not None for s in slots), "a layer of the group left its slots"
        return slots  # type: ignore[return-value]

    def _positions(self, slots: list[Slots]) -> torch.Tensor:
        """The layers' slot positions ``(N, B, H, C)``, padded at the end of the slot axis with ``PADDING``."""
        return pad_sequence([s.positions.movedim(-1, 0) for s in slots], batch_first=True,
                            padding_value=self.PADDING).movedim(1, -1)

    def resort(self) -> None:
        """Sort the position order anew, after the slots changed outside a decoding step (crop, beam search)."""
        self.order.copy_(torch.sort(self._positions(self._slots()), dim=-1, stable=True).indices)

    def collect(self, layer_idx: int, probs: torch.Tensor) -> bool:
        """Keep a layer's attention ``(B, Hq, C)`` over its slots; whether it was the group's last layer."""
        n = self._index[layer_idx]
        self._probs[n] = probs
        return n == len(self.members) - 1

    def evict(self, method: Method) -> None:
        """Score every member's entries in position order and free the slot each drops (at most one per row and
        head), as :func:`kvcake.engines.transformers.decode.attend_slots` does for one layer."""
        probs = [p for p in self._probs if p is not None]
        self._probs = [None] * len(self.members)
        if len(probs) != len(self.members):
            raise RuntimeError("a decoding step reached the end of its evicting layers without all of them")
        slots = self._slots()
        if not torch.compiler.is_compiling() and self.order.is_inference() and not torch.is_inference_mode_enabled():
            self.order = self.order.clone()  # made under inference_mode, written outside it: copied once
            static_buffers(self.order, axis=-1)
        positions = self._positions(slots)
        padded = pad_sequence([p.movedim(-1, 0) for p in probs], batch_first=True).movedim(1, -1)  # (N, B, Hq, C)
        layers, batch, kv_heads, capacity = positions.shape
        q_heads = padded.shape[2]
        groups = q_heads // kv_heads
        order = self.order.gather(-1, self.after_write.expand_as(self.order))  # this step's write went last
        ordered = padded.view(layers, batch, kv_heads, groups, capacity).gather(
            -1, order.unsqueeze(3).expand(layers, batch, kv_heads, groups, capacity))
        in_order = positions.gather(-1, order)
        occupied = in_order >= 0
        rows = layers * batch
        view = DecodeView(query=None, scaling=1.0, softcap=None, positions=in_order.view(rows, kv_heads, capacity),
                          allowed=occupied.view(rows, kv_heads, capacity), stored=None,
                          probs=ordered.view(rows, q_heads, capacity), window=method.window)
        scores = method.scorer.decode(view).view(layers, batch, kv_heads, capacity)
        lowest = lowest_candidate(scores, occupied, method.window)  # (N, B, H, 1), in position order
        first = slots[0]  # every layer has the same cursor, start and schedule length (split)
        step = first.schedule_step()
        targets = torch.stack([s.target(step) for s in slots])  # (N, B, 1)
        chosen = ((occupied.sum(-1) > targets).unsqueeze(-1) & occupied.gather(-1, lowest))
        slot = order.gather(-1, lowest)
        # The order after the drop: the freed slot moves from ``lowest`` to its place among the free slots (by slot
        # index, as the stable sort puts them); nothing moves where nothing is dropped.
        place = self.padding + ((in_order == -1) & (order < slot)).sum(-1, keepdim=True)
        place = torch.where(chosen, place, lowest)
        index = self.index
        source = torch.where(index == place, lowest, index - ((index > place) & (index <= lowest)).long())
        self.order.copy_(order.gather(-1, source))
        freed = in_order.gather(-1, lowest).masked_fill(chosen, -1).unbind(0)
        dropped = chosen.squeeze(-1).to(first.count.dtype).unbind(0)
        for n, (s, at) in enumerate(zip(slots, slot.unbind(0), strict=True)):
            s.positions.scatter_(-1, at, freed[n])
            s.count.sub_(dropped[n])


__all__ = ["LayerGroup"]
