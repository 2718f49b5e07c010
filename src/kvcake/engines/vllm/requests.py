"""One request inside the vLLM engine: its prefill scored layer by layer, its kept entries compacted into its own
blocks, and each layer held at its budget while it decodes.

A compressed layer's entries live in a *region*: ``count`` consecutive slots starting at the first slot of block
``first_block`` of the request's block table for that layer (every layer has its own table: one KV-cache group per
layer). The attention backend hands vLLM's kernel the table from ``first_block`` on and a sequence length of
``count`` plus the new tokens, and writes a new token at the region's end. Blocks before ``first_block`` hold nothing
the request reads, so the scheduler returns them to vLLM's pool.

``first_block`` is the largest block index that still leaves room for the next token at the region's end:
``(logical_length - count) // block_size``. Without decode-time eviction it is fixed after prefill (the region and the
logical length grow together); with it the region keeps its size while the logical length grows, and once a whole
block has passed, the region moves one block on (its entries are copied, the block it left is freed): the cost of
block granularity is that copy, once per ``block_size`` generated tokens, and at most one partly used block per layer.

What to keep is decided by :mod:`kvcake.methods` alone (the scorer, the allocator, :class:`RequestBudget`,
:func:`select_drops`), exactly as the transformers engine asks it, so both engines keep the same entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvcake.engines.vllm.paged import PagedLayer, PagedRows
from kvcake.methods.attention import probs_from_logits
from kvcake.methods.base import Method
from kvcake.methods.budget import RequestBudget
from kvcake.methods.decoding import select_drops
from kvcake.methods.views import DecodeView, LayerView


class Phase(Enum):
    """Where a request is: its prompt being prefilled, or decoding over compacted regions."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Region:
    """The entries one layer of a request holds after compaction (see the module docstring)."""

    first_block: int
    count: int
    positions: torch.Tensor | None  # (Hkv, count) original position of each slot; kept only for decode-time eviction
    stored: torch.Tensor | None = None  # (Hkv, count) scores kept beside the entries (H2O's sums)

    def slots(self, block_size: int) -> torch.Tensor:
        """The region's slots, in the request's block table."""
        start = self.first_block * block_size
        return torch.arange(start, start + self.count)

    def next_slots(self, block_size: int, tokens: int) -> torch.Tensor:
        """The slots the next ``tokens`` new tokens are written to: right after the region."""
        end = self.first_block * block_size + self.count
        return torch.arange(end, end + tokens)


def top_positions(ranked: torch.Tensor, count: int) -> torch.Tensor:
    """Positions ``(Hkv, count)`` of the ``count`` highest-ranked entries per head, in increasing order; ties go to the
    earlier position (a stable sort), as the transformers engine keeps them."""
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :count]
    return torch.sort(order, dim=-1).values


@dataclass
class RequestState:
    """What the worker knows of one request between steps."""

    method: Method
    prompt_tokens: int
    num_layers: int
    block_size: int
    phase: Phase = Phase.PREFILL
    budget: RequestBudget | None = None
    ranked: list[torch.Tensor | None] = field(default_factory=list)  # per layer (Hkv, S): scores, window at +inf
    raw: list[torch.Tensor | None] = field(default_factory=list)  # per layer: the scores themselves (H2O keeps them)
    regions: list[Region] = field(default_factory=list)
    logical: int = 0  # tokens whose entries were computed (prompt, then generated)
    #: Under tensor parallelism, sums a layer's preference parts over the ranks (each holds some of the heads), so
    #: that every rank splits the budget alike; None on one rank.
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.budget = RequestBudget(self.method, self.num_layers, [self.prompt_tokens], self.prompt_tokens)
        self.ranked = [None] * self.num_layers
        self.raw = [None] * self.num_layers

    @property
    def evicts_while_decoding(self) -> bool:
        return self.method.decode_eviction

    @property
    def keeps_scores(self) -> bool:
        return self.method.decode_eviction and self.method.scorer.keeps_scores

    # -- prefill -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_layer(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                    softcap: float | None) -> None:
        """Score one layer at the end of the prompt: ``query`` ``(S, Hq, D)``, ``keys``/``values`` ``(S, Hkv, D)``."""
        method = self.method
        view = LayerView(query=query.transpose(0, 1).unsqueeze(0), keys=keys.transpose(0, 1).unsqueeze(0),
                         scaling=scaling, key_valid=None, softcap=softcap, layer=layer, num_layers=self.num_layers,
                         values=values.transpose(0, 1).unsqueeze(0))
        allocator = method.allocator
        if self.reduce is None:
            preference = allocator.preference(view, method.window)
        else:
            parts = allocator.preference_parts(view, method.window)
            preference = None if parts is None else allocator.preference_of(self.reduce(parts))
        scores = method.scorer.prefill(view, method.window)[0].float()
        ranked = scores.clone()
        ranked[..., max(0, ranked.shape[-1] - method.window):] = float("inf")
        self.ranked[layer] = ranked
        self.raw[layer] = scores if self.keeps_scores else None
        assert self.budget is not None
        self.budget.push(preference, keys.device)

    @torch.no_grad()
    def compact(self, layers: list[PagedLayer], tables: list[torch.Tensor]) -> list[int]:
        """After the last layer was scored: keep each layer's budget, move the kept entries to the start of its
        region, and return each layer's first block (those before it are free)."""
        budget = self.budget
        assert budget is not None
        budget.set_shares(budget.device_shares().tolist())
        budget.finish_device()
        self.regions = []
        for index, (paged, table) in enumerate(zip(layers, tables, strict=True)):
            ranked, raw = self.ranked[index], self.raw[index]
            assert ranked is not None
            heads = ranked.shape[0]
            if budget.keeps_everything(index):  # nothing to evict: the layer stays as vLLM wrote it
                count, kept = self.prompt_tokens, None
            else:
                count = int(budget.keep_counts(index, ranked.unsqueeze(0))[0])
                kept = top_positions(ranked, count)
            first = (self.prompt_tokens - count) // self.block_size
            region = Region(first, count, None)
            if kept is not None:
                keys, values = paged.read(table, kept)
                paged.write(table, region.slots(self.block_size).expand(heads, -1), keys, values)
            if self.evicts_while_decoding:
                positions = torch.arange(count).expand(heads, -1) if kept is None else kept
                region.positions = positions.clone()
                if raw is not None:
                    region.stored = raw.gather(-1, positions)
            self.regions.append(region)
        self.ranked, self.raw = [None] * self.num_layers, [None] * self.num_layers
        self.logical = self.prompt_tokens
        self.phase = Phase.DECODE
        return [r.first_block for r in self.regions]

    # -- decoding ----------------------------------------------------------------------------------------------------
    def grown(self, layer: int) -> int | None:
        """The new token was written at the end of layer ``layer``'s region: count it. With decode-time eviction,
        returns how many entries the layer must drop now (0 when within its target), else None. The token's
        position joins ``region.positions`` in :func:`decode_layers`, batched with the other requests and layers."""
        region = self.regions[layer]
        region.count += 1
        if not self.evicts_while_decoding:
            return None
        assert self.budget is not None
        return max(region.count - self.budget.decode_targets(self.logical + 1)[0][layer], 0)

    def decoded(self, layer: int, paged: PagedLayer, table: torch.Tensor, query: torch.Tensor, scaling: float,
                softcap: float | None) -> None:
        """After the attention of one new token (``query`` ``(1, Hq, D)``, written at the region's end): grow the
        region, and with decode-time eviction drop what the method drops and keep the region compact
        (:func:`decode_layers` for one layer of a batch of one)."""
        decode_layers([self], [layer], [paged], [[table]], [query], scaling, softcap)

    def advance(self, layers: list[PagedLayer], tables: list[torch.Tensor]) -> list[int] | None:
        """After every layer decoded a token: the logical length grows; a region whose first block the request no
        longer needs moves on. Returns every layer's first block when one moved, else None."""
        self.logical += 1
        moved = False
        for region, paged, table in zip(self.regions, layers, tables, strict=True):
            first = (self.logical - region.count) // self.block_size
            if first > region.first_block:
                paged.move_run(table, region.first_block, region.count, first)
                region.first_block = first
                moved = True
        return [r.first_block for r in self.regions] if moved else None


@torch.no_grad()
def decode_layers(states: list[RequestState], layers: list[int], pages: list[PagedLayer],
                  tables: list[list[torch.Tensor]], queries: list[torch.Tensor], scaling: float,
                  softcap: float | None) -> None:
    """The eviction of a decoding step, for every layer and request of the batch at once, once every layer has
    attended: layer ``layers[i]`` lives in ``pages[i]``, request ``r``'s block table there is ``tables[i][r]``, and
    ``queries[i]`` ``(R, Hq, D)`` are the new tokens' queries (written at the end of their regions). A layer's
    eviction only changes what the next step attends to, so evicting every layer after the last one keeps exactly
    what evicting each layer after its own attention keeps.

    Each region grows by its token; with decode-time eviction the method scores every region's entries in one
    padded batch (empty entries first, then the tokens by position, as :mod:`kvcake.methods.decoding` expects),
    each region drops what its layer's target says, and the entries past each region's new end move into the freed
    slots before it. The position tables are padded ``(layers x requests, Hkv, width)`` for the step, and each
    region's table is a view of its row: per layer and request the work is two copies into the batch, whatever
    the number of layers and requests."""
    grown = [(i, row, drops) for i, layer in enumerate(layers) for row, state in enumerate(states)
             if (drops := state.grown(layer)) is not None]
    if not grown:
        return
    regions = [states[row].regions[layers[i]] for i, row, _ in grown]
    sizes = [0] * len(layers)
    for i, _, _ in grown:
        sizes[i] += 1
    drop_counts = torch.tensor([drops for *_, drops in grown])
    method = states[0].method
    rows, heads, bs = len(grown), pages[0].heads, pages[0].block_size
    counts = torch.tensor([region.count for region in regions])
    width = int(counts.max())
    positions = _padded([region.positions for region in regions], width, -1)  # (B, Hkv, width), slot order
    new = torch.tensor([states[row].logical for _, row, _ in grown]).view(rows, 1, 1).expand(rows, heads, 1)
    positions.scatter_(-1, (counts - 1).view(rows, 1, 1).expand(rows, heads, 1), new)  # the new token, at the end
    stored = None
    if regions[0].stored is not None:
        stored = _padded([region.stored for region in regions], width, 0)
    if bool(drop_counts.any()) or stored is not None:
        firsts = torch.tensor([region.first_block for region in regions])
        batch = PagedRows([page for page, size in zip(pages, sizes, strict=True) if size],
                          [size for size in sizes if size])
        ids = batch.run_blocks([tables[i][row] for i, row, _ in grown], firsts, -(-width // bs))
        q = torch.cat([queries[i][[row for j, row, _ in grown if j == i]] for i, size in enumerate(sizes) if size])
        stored = _score_and_drop(method, batch, ids, q.float(), scaling, softcap, positions, stored, counts,
                                 drop_counts)
    for row, (region, count) in enumerate(zip(regions, (counts - drop_counts).tolist(), strict=True)):
        region.count = count  # each region's tables: views of the batch's rows
        region.positions = positions[row, :, :count]
        if stored is not None:
            region.stored = stored[row, :, :count]


def _padded(tables: list[torch.Tensor | None], width: int, fill: float) -> torch.Tensor:
    """``(R, Hkv, width)`` from per-request ``(Hkv, n)`` tables, padded with ``fill`` at the end."""
    assert all(t is not None for t in tables)
    batch = torch.nn.utils.rnn.pad_sequence([t.transpose(0, 1) for t in tables if t is not None], batch_first=True,
                                            padding_value=fill)  # (R, n_max, Hkv)
    out = batch.new_full((batch.shape[0], width, batch.shape[2]), fill)
    out[:, :batch.shape[1]] = batch
    return out.transpose(1, 2).contiguous()


def _score_and_drop(method: Method, paged: PagedRows, ids: torch.Tensor, q: torch.Tensor, scaling: float,
                    softcap: float | None, positions: torch.Tensor, stored: torch.Tensor | None,
                    counts: torch.Tensor, drop_counts: torch.Tensor) -> torch.Tensor | None:
    """Score the batch's regions (blocks ``ids``, ``counts`` entries each), pick each row's drops, move the entries
    past each region's new end into the freed slots before it, and update ``positions`` (in place, slot order) the
    same way; returns the scores kept beside the entries (H2O), moved alike."""
    rows, heads, width = positions.shape
    slot = torch.arange(width)
    valid = slot < counts[:, None]  # (B, width), in slot order
    logits = paged.logits(ids, q)[..., :width]
    groups = logits.shape[2]
    padded = not bool(valid.all())
    probs = probs_from_logits(logits, scaling, valid[:, None, None, None] if padded else None, softcap,
                              check=False)[:, :, 0]  # attention does not depend on the entries' order
    order = torch.sort(positions, dim=-1, stable=True).indices  # slot order -> position order, empty entries first
    take = order.unsqueeze(-1)

    def read(which: int) -> torch.Tensor:  # keys (0) or values (1) in position order, for scorers that read them
        entries = paged.read_blocks(ids, which)[:, :, :width]
        return entries.gather(2, take.expand_as(entries)).masked_fill(~occupied.unsqueeze(-1), 0.0)

    occupied = (slot >= width - counts[:, None])[:, None].expand(rows, heads, width)  # position order
    view = DecodeView(query=q.unsqueeze(2), scaling=scaling, softcap=softcap, positions=positions.gather(-1, order),
                      allowed=occupied if padded else None,
                      stored=None if stored is None else stored.gather(-1, order),
                      probs=probs.gather(-1, order.repeat_interleave(groups, dim=1)), window=method.window,
                      read_keys=lambda: read(0), read_values=lambda: read(1))
    scores = method.scorer.decode(view)
    if stored is not None:
        stored = torch.empty_like(scores).scatter_(-1, order, scores).to(stored.dtype)
    most = int(drop_counts.max())
    if most == 0:
        return stored
    dropped = select_drops(scores, occupied, drop_counts.view(-1, 1), method.window, most)
    dropped = torch.zeros_like(dropped).scatter_(-1, order, dropped)  # back to slot order
    # Pair the freed slots inside each new run with the kept entries past its end, both in slot order.
    remaining = (counts - drop_counts).view(rows, 1, 1)
    hole = dropped & (slot < remaining)
    mover = ~dropped & (slot >= remaining) & valid[:, None]
    pairs = hole.sum(-1)  # (R, Hkv): as many movers as holes
    most_pairs = int(pairs.max())
    if most_pairs == 0:
        return stored
    beyond = width + slot  # sorts the slots that are not holes (movers) after those that are
    # the ``most_pairs`` smallest, in order (a top-k, much cheaper than a sort when few entries drop, as is usual)
    holes = torch.where(hole, slot, beyond).topk(most_pairs, dim=-1, largest=False).values
    movers = torch.where(mover, slot, beyond).topk(most_pairs, dim=-1, largest=False).values
    row, head, j = (torch.arange(most_pairs) < pairs.unsqueeze(-1)).nonzero(as_tuple=True)
    src, dst = movers[row, head, j], holes[row, head, j]
    paged.copy_slots(ids, row, head, src, dst)
    positions[row, head, dst] = positions[row, head, src]
    if stored is not None:
        stored[row, head, dst] = stored[row, head, src]
    return stored


__all__ = ["Phase", "Region", "RequestState", "decode_layers", "top_positions"]
