"""Decode-time eviction of every evicting layer of a decoding step in one batch (see :class:`LayerGroup`)."""

from __future__ import annotations

import torch

from kvcake.engines.transformers.ops import register_group
from kvcake.engines.transformers.slots import Slots, schedule_row, static_buffers
from kvcake.engines.transformers.storage import CompressedLayer
from kvcake.methods.base import Method
from kvcake.methods.views import DecodeView


class LayerGroup:
    """Decode-time eviction of every evicting layer of a step, scored and chosen in one batch after the last of them
    attended.

    At a decoding step a layer's eviction reads nothing but that layer's attention probabilities and slot positions,
    and nothing reads the layer again before the next step, so choosing its dropped entry after the last layer
    attended leaves the same cache as choosing it at once. Batched, the scoring, pooling, arg-min and target check
    are one set of operators for all the layers rather than one per layer (a few operators per layer remain: copying
    its probabilities into the batch, its count and target, freeing its slot), which is most of what decode-time
    eviction costs eagerly.

    The layers' slot axes differ (their capacities do): each layer's probabilities are padded at the end of the slot
    axis with zeros, which sort first in the group's position order (below), so in position order every row is
    padding, free slots, tokens, as a scorer with ``decode_from_probs`` expects; zero probabilities pool like the
    zero padding a layer's own row has at its edges, so the scores are the same. The tokens are the last ``count``
    entries of every row in that order, so which entries hold a token follows from the counts alone.

    The position order of the slots is kept from step to step instead of sorted anew (a stable sort of every
    layer's slots per step was the most expensive operator of a layer's eviction). The group chooses the slot each
    layer writes its next token into (:attr:`Slots.next_slot`), the one a layer on its own would take (its free slot
    of lowest index), and keeps the order as it is once that write is done: the written slot, holding the newest
    position, last; the free slots, in slot order, before the tokens. A step's drop moves the dropped slot to the
    end where it is the free slot of lowest index (always, where a layer holds no other free slot), else to its
    place among the free slots while the first free slot goes to the end; a step that drops nothing moves the first
    free slot to the end. Each is one gather for all the layers. Anything else that moves entries (a crop, beam
    search) calls :meth:`resort`.

    A layer whose target shrinks as a token comes in drops more than one entry that step (CAKE's decode schedule: a
    layer capped by a short prompt fills up, the others give up its share; up to :attr:`max_drops`). Such a step
    takes each row's lowest entries one arg-min after another and sorts anew the order of the layers that dropped
    several (on the CPU; the others take the single drop's update). GPUs, which cannot tell such a step from another
    without a host sync, sort every layer at every step: one sort of the batch, where each layer on its own sorted
    twice.

    The whole eviction is one operator, ``kvcake::evict_group`` (:mod:`kvcake.engines.transformers.ops`), which a
    compiled step calls as it is, rather than tracing it: compiled or not, a step runs this code as written here.

    Used where the method's scorer has ``decode_from_probs`` and keeps no scores (:meth:`split`, which also keeps
    layers of very different capacities apart); otherwise each layer evicts in its own call.
    """

    PADDING = -2
    #: The largest ratio of capacities within one group (see :meth:`split`); None: one group. On SmolLM2 at 8K
    #: (capacities 43 to 2,245) one group decoded faster than 3 to 6 groups by capacity (102.8 ms a step against
    #: 119.8-123.6; `benchmarks/group_spread.py`, one run): each group costs its own 43 operators a step, more than
    #: scoring the padding costs at these sizes.
    SPREAD: float | None = None
    #: Added to the scores of the entries that hold no token before the arg-min: they can never be the lowest (an
    #: additive mask of floats costs a fraction of a masked fill on the CPU; scores are attention, at most 1).
    EMPTY = 1e30

    def __init__(self, members: list[int], layers: list[CompressedLayer], method: Method) -> None:
        self.members = members  # cache layer indices, in the order the model calls them
        self.layers = layers
        self.method = method
        self._index = {layer_idx: n for n, layer_idx in enumerate(members)}
        self._probs: list[torch.Tensor | None] = [None] * len(members)
        self._padded: torch.Tensor | None = None
        self._parts: list[torch.Tensor] = []  # each layer's part of ``_padded`` (its own slots)
        slots = self._slots()
        device, capacity = slots[0].positions.device, max(s.capacity for s in slots)
        padding = torch.tensor([capacity - s.capacity for s in slots], device=device).view(-1, 1, 1, 1)
        #: (N, 1, 1, 1) padding entries of each layer, first in position order.
        self.padding = padding
        #: (N, 1, 1) each layer's slots.
        self.capacities = (capacity - padding).view(-1, 1, 1)
        #: (1, 1, 1, C) the entry indices, as int32 (the order's updates are computed in int32: four times faster
        #: than int64 on the CPU) and as float (the arg-min's mask).
        self.index = torch.arange(capacity, device=device, dtype=torch.int32).view(1, 1, 1, -1)
        self.index_float = self.index.float()
        register_group(self, self.index)  # kvcake::evict_group finds the group by it
        #: (N, B, H, C) the slots of every layer in position order once the next token is written (padding, free
        #: slots, tokens, the slot of the next token last).
        self.order = torch.empty((len(slots), *slots[0].positions.shape[:-1], capacity), dtype=torch.long,
                                 device=device)
        #: (B, H) per layer, the slot it writes its next token into (see :attr:`Slots.next_slot`): the last of the
        #: order. A tensor of each layer's own, not a row of one: inputs of a compiled step that are views of one
        #: tensor cost it aliasing checks and, when its writes were traced, a C++ kernel per layer (issue 23).
        self.nexts = [torch.empty(self.order.shape[1:-1], dtype=torch.long, device=device) for _ in slots]
        #: (S + 1, N, B) every layer's decode schedule (:attr:`Slots.targets`).
        self.targets = torch.empty(0)
        #: The most entries a layer of the group drops in one step (:attr:`Slots.max_drops`, a host constant).
        self.max_drops = max(s.max_drops for s in slots)
        self.resort()
        static_buffers(self.index, self.index_float, axis=-1)
        self._bind(slots)

    @classmethod
    def split(cls, method: Method, layers: dict[int, CompressedLayer], spread: float | None) -> list[LayerGroup]:
        """The groups of the frozen layers that evict while decoding (none where they cannot be batched).

        Layers are padded to the largest capacity of their group, so with budgets as uneven as CAKE's (one layer
        may hold 60 times what another does) one group would score mostly padding. ``spread`` bounds the ratio of
        the largest capacity to the smallest within a group: layers sorted by capacity are grouped greedily.
        None makes one group of them all, whatever their budgets: what compiled decoding needs, since which layers
        go together is part of the compiled step and must not change from one request to the next.
        """
        for layer in layers.values():
            if layer.slots is not None:
                layer.slots.next_slot = None  # a layer on its own writes into its first free slot
        evicting = {i: layer.slots for i, layer in layers.items()
                    if layer.slots is not None and layer.slots.targets is not None}
        tables = {s.targets.shape for s in evicting.values() if s.targets is not None}
        if (not evicting or not method.scorer.decode_from_probs or method.scorer.keeps_scores
                or len(tables) != 1 or any(s.capacity <= method.window for s in evicting.values())):
            return []
        buckets: list[list[int]] = []
        for i in sorted(evicting, key=lambda i: evicting[i].capacity):
            if buckets and (spread is None or evicting[i].capacity <= spread * evicting[buckets[-1][0]].capacity):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        return [cls(sorted(bucket), [layers[i] for i in sorted(bucket)], method) for bucket in buckets]

    def _slots(self) -> list[Slots]:
        slots = [layer.slots for layer in self.layers]
        assert all(s is not None for s in slots), "a layer of the group left its slots"
        return slots  # type: ignore[return-value]

    def resort(self) -> None:
        """Sort the position order anew, after the slots changed outside a decoding step (crop, beam search), and
        read the layers' schedules again."""
        slots = self._slots()
        # The first free slot: the next token's.
        self.order.copy_(self._move_last(self._sorted([s.positions for s in slots]), self.padding))
        self._choose_next(self.order, self.nexts)
        targets = torch.stack([s.targets for s in slots], dim=1)  # type: ignore[misc]
        if targets.shape == self.targets.shape:
            self.targets.copy_(targets)
        else:
            self.targets = targets

    def _bind(self, slots: list[Slots]) -> None:
        """Mark the tables the step writes as static buffers and point each layer's next write at its table."""
        static_buffers(self.order, axis=-1)
        static_buffers(*self.nexts, axis=None)
        static_buffers(self.targets, axis=0)
        for s, nxt in zip(slots, self.nexts, strict=True):
            s.next_slot = nxt

    @staticmethod
    def _choose_next(order: torch.Tensor, nexts: list[torch.Tensor]) -> None:
        """Each layer's next write goes to the last slot of its order."""
        torch._foreach_copy_(nexts, list(order[..., -1].unbind(0)))

    def _move_last(self, order: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        """``order`` with entry ``entry`` ``(N, B|1, H|1, 1)`` of every row moved to the end, those after it one
        place forward."""
        index = self.index
        source = (index + (index - entry.int() + 1).clamp_(0, 1)).clamp_(max=index.shape[-1] - 1).long()
        moved = order.gather(-1, source.expand_as(order))
        moved[..., -1:] = order.gather(-1, entry.expand(*order.shape[:-1], 1))
        return moved

    def _after_drop(self, order: torch.Tensor, first: torch.Tensor, lowest: torch.Tensor,
                    chosen: torch.Tensor) -> torch.Tensor:
        """The order once the next token is written, after this step's drops (``chosen``: entry ``lowest``)."""
        padding, index = self.padding, self.index
        shape = (*order.shape[:-1], 1)
        dropped = order.gather(-1, lowest)
        lowest_free = order.gather(-1, padding.expand(shape))
        # Where the dropped slot is not the free slot of lowest index, the next token takes that one, and the
        # dropped slot goes to its place among the free slots (all of them before ``first``).
        insert = chosen & (first > padding) & (lowest_free < dropped)
        # The general form serves every row; on the CPU the shorter one is taken where it suffices (one host sync,
        # which a GPU's queue should not wait for).
        if self._no_host_sync(order.device) or bool(insert.any()):
            # Free slots of a lower index (the padding holds the slots past the layer's own: none of them).
            below = ((order < dropped) & (index < first)).sum(-1, keepdim=True)
            place = (torch.where(insert, padding + below - 1, index.shape[-1] - 1)).int()  # (N, B, H, 1)
            start = torch.where(insert, padding, index.shape[-1] - 1).int()
            # Entries from ``start`` up to ``place`` and from the removed one on come from one place further.
            shift = (index - start + 1).clamp_(0, 1) * (place - index).clamp_(0, 1)
            removed = torch.where(chosen, lowest, padding).int()
            source = (index + shift + (index - removed + 1).clamp_(0, 1)).clamp_(max=index.shape[-1] - 1).long()
            moved = order.gather(-1, source)
            nxt = torch.where(chosen & ~insert, dropped, lowest_free)
            moved.scatter_(-1, place.long(), torch.where(insert, dropped, nxt))
            moved[..., -1:] = nxt
            return moved
        return self._move_last(order, torch.where(chosen, lowest, padding))

    def _padded_buffer(self, like: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Zeros of ``shape`` that every step's probabilities are written into on the CPU, over their own slots only (so
        the padding stays zero), kept from step to step (a new buffer each step costs more than the copy), and each
        layer's part of it (a view made once: making thirty views a step costs as much as filling them)."""
        buffer = self._padded
        if (buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device
                or buffer.is_inference() != torch.is_inference_mode_enabled()):
            buffer = self._padded = like.new_zeros(shape)
            self._parts = [buffer[n, :, :, :s.capacity] for n, s in enumerate(self._slots())]
        return buffer, self._parts

    def collect(self, layer_idx: int, probs: torch.Tensor) -> bool:
        """Keep a layer's attention ``(B, Hq, C)`` over its slots; whether it was the group's last layer."""
        n = self._index[layer_idx]
        self._probs[n] = probs
        return n == len(self.members) - 1

    def evict(self) -> None:
        """Score every member's entries in position order and free the slots each drops, as
        :func:`kvcake.engines.transformers.decode.attend_slots` does for one layer; choose the slots of the next
        step's writes. One ``kvcake::evict_group`` call (:mod:`kvcake.engines.transformers.ops`), given every tensor
        the step writes and the cursor; it runs :meth:`evict_tensors`."""
        probs = [p for p in self._probs if p is not None]
        self._probs = [None] * len(self.members)
        if len(probs) != len(self.members):
            raise RuntimeError("a decoding step reached the end of its evicting layers without all of them")
        slots = self._slots()
        if not torch.compiler.is_compiling() and self.order.is_inference() and not torch.is_inference_mode_enabled():
            self.order, self.targets = self.order.clone(), self.targets.clone()  # made under inference_mode
            self.nexts = [nxt.clone() for nxt in self.nexts]
            self._bind(slots)
        torch.ops.kvcake.evict_group(self.index, probs, self.order, self.nexts, [s.positions for s in slots],
                                     [s.count for s in slots], slots[0].overflow, slots[0].cursor)

    def evict_tensors(self, probs: list[torch.Tensor], order: torch.Tensor, nexts: list[torch.Tensor],
                      positions: list[torch.Tensor], counts: list[torch.Tensor], overflow: torch.Tensor,
                      cursor: torch.Tensor) -> None:
        """:meth:`evict` on the tensors given (the operator's arguments: the group's own, or what a compiled graph
        passes for them): each layer's probabilities ``(B, Hq, C)``, the position order, the next-slot tables, each
        layer's slot positions and counts, the overflow flag and the cursor (every layer has the same, and the same
        schedule start and length: :meth:`split`)."""
        method = self.method
        layers, batch, kv_heads, capacity = order.shape
        # Scorers that average each GQA group first are given the average (the same scores, a group's size fewer
        # values to reorder); the average of each layer is written into the batch directly.
        heads = kv_heads if method.scorer.decode_averages_groups else probs[0].shape[1]
        groups = probs[0].shape[1] // heads
        if self._no_host_sync(order.device):
            # Each layer padded to the group's capacity, then stacked: no buffer kept from one step to the next, which
            # a CUDA graph's replays could not keep for it.
            averaged = [p.view(batch, heads, groups, -1).mean(dim=2) if groups > 1 else p for p in probs]
            padded = torch.stack([torch.nn.functional.pad(a, (0, capacity - a.shape[-1])) for a in averaged])
        else:
            padded, parts = self._padded_buffer(probs[0], (layers, batch, heads, capacity))
            if groups > 1:
                # The mean of each group as torch.mean computes it on the CPU (the sum, then divided by the count),
                # bit for bit, with the division done once for the batch.
                for p, into in zip(probs, parts, strict=True):
                    torch.sum(p.view(batch, heads, groups, -1), dim=2, out=into)
                padded.div_(groups)
            else:
                for p, into in zip(probs, parts, strict=True):
                    into.copy_(p)
        held = torch.stack(counts).unsqueeze(-1)  # (N, B, H, 1) tokens, this step's included
        # A write that found no free slot counted a token more than the layer has slots (ops.slot_write).
        overflow.logical_or_((held.squeeze(-1) > self.capacities).any())
        per_head = heads // kv_heads
        ordered = padded.view(layers, batch, kv_heads, per_head, capacity).gather(
            -1, order.unsqueeze(3).expand(layers, batch, kv_heads, per_head, capacity))  # this step's write last
        first = capacity - held  # (N, B, H, 1) the first entry that holds a token, in position order
        rows = layers * batch
        view = DecodeView(query=None, scaling=1.0, softcap=None, positions=None, allowed=None, stored=None,
                          probs=ordered.view(rows, heads, capacity), window=method.window, heads=kv_heads)
        scores = method.scorer.decode(view).view(layers, batch, kv_heads, capacity)
        cut = capacity - max(method.window, 0)  # the newest ``window`` entries are never dropped
        empty = (first.float() - self.index_float[..., :cut]).clamp_(0, 1)  # 1 where no token
        ranked = torch.add(scores[..., :cut].float(), empty, alpha=self.EMPTY)
        lowest = ranked.argmin(dim=-1, keepdim=True)
        # Every layer's schedule start, written between requests only (as the schedules are).
        step = schedule_row(cursor, self._slots()[0].start, self.targets.shape[0])
        targets = self.targets.index_select(0, step).view(layers, batch, 1)
        excess = held.squeeze(-1) - targets  # (N, B, H) the entries each row and head drops this step
        chosen = (excess > 0).unsqueeze(-1) & (lowest >= first)
        several = self._dropping_several(excess) if self.max_drops > 1 else []
        if several:
            lowest, chosen = self._lowest(ranked, lowest, chosen, excess, first)
        self._free(positions, counts, order, lowest, chosen)
        if len(several) == layers:
            order.copy_(self._move_last(self._sorted(positions), self.padding))
        else:
            # The layers whose rows drop one at most take the single drop's order; the others are sorted anew.
            moved = self._after_drop(order, first, lowest[..., :1], chosen[..., :1])
            if several:
                moved[several] = self._move_last(self._sorted([positions[n] for n in several]), self.padding[several])
            order.copy_(moved)
        self._choose_next(order, nexts)

    @staticmethod
    def _no_host_sync(device: torch.device) -> bool:
        """Whether the step must not wait for the device (a GPU's queue, or a CUDA graph that replays the step): then
        it takes the general form of each update, where on the CPU it looks first at which rows need it."""
        return device.type != "cpu"

    def _dropping_several(self, excess: torch.Tensor) -> list[int]:
        """The layers where some row may drop more than one entry this step: on a GPU every layer (no host sync); on
        the CPU those where one does (one host sync, which spares the other layers the sort: at SmolLM2 2K a few
        layers a step)."""
        if self._no_host_sync(excess.device):
            return list(range(excess.shape[0]))
        return (excess > 1).flatten(1).any(1).nonzero().view(-1).tolist()

    def _lowest(self, ranked: torch.Tensor, lowest: torch.Tensor, chosen: torch.Tensor, excess: torch.Tensor,
                first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``max_drops`` lowest entries ``(N, B, H, K)`` of every row, lowest first (the first minimum each time,
        so ties go to the earlier position), and which of them are dropped: the first ``excess``.

        This is :func:`~kvcake.methods.decoding.select_drops`' choice for a layer on its own: a target is never below
        the window, so a row never drops more entries than it holds outside the window (the entries past ``cut``),
        and every one chosen holds a token (an entry that holds none ranks above every token, and at or past
        ``first`` there are none such)."""
        entries, picked = [lowest], [chosen]
        for k in range(1, self.max_drops):
            ranked = ranked.scatter(-1, entries[-1], float("inf"))  # taken: never the lowest again
            entries.append(ranked.argmin(dim=-1, keepdim=True))
            picked.append((excess > k).unsqueeze(-1) & (entries[-1] >= first))
        return torch.cat(entries, dim=-1), torch.cat(picked, dim=-1)

    def _free(self, positions: list[torch.Tensor], counts: list[torch.Tensor], order: torch.Tensor,
              lowest: torch.Tensor, chosen: torch.Tensor) -> None:
        """Free the slots of the chosen entries ``(N, B, H, K)`` (indices in position order) of every layer, given its
        slot positions and count."""
        slot = torch.where(chosen, order.gather(-1, lowest), 0)  # (slot 0 of every layer where nothing is freed)
        # The minimum of a slot's position and -1 where chosen, of it and a larger value not.
        freed = torch.where(chosen, -1, torch.iinfo(torch.int64).max).unbind(0)
        dropped = chosen.sum(-1).to(counts[0].dtype).unbind(0)
        for n, (where, count, at) in enumerate(zip(positions, counts, slot.unbind(0), strict=True)):
            where.scatter_reduce_(-1, at, freed[n], "amin")
            count.sub_(dropped[n])

    def _sorted(self, positions: list[torch.Tensor]) -> torch.Tensor:
        """The slots ``(N, B, H, C)`` of the layers with the given slot positions in position order, sorted anew:
        padding, free slots by index, tokens. Each layer's positions are padded at the end of the slot axis with
        ``PADDING`` to the order's size."""
        capacity = self.order.shape[-1]
        padded = [torch.nn.functional.pad(p, (0, capacity - p.shape[-1]), value=self.PADDING) for p in positions]
        return torch.sort(torch.stack(padded), dim=-1, stable=True).indices


__all__ = ["LayerGroup"]
