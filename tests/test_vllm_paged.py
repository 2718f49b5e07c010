"""The vLLM engine's request state on a paged cache, without vLLM: what a region holds is always what its position
table says, compaction keeps the top-scored entries, decode-time eviction keeps the region one run of slots at its
target, and regions move on block by block."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from conftest import CountOperators
from kvcake.engines.vllm.paged import PagedLayer, PagedRows
from kvcake.engines.vllm.requests import Phase, RequestState, decode_layers, top_positions
from kvcake.methods.attention import attention_probs, probs_from_logits
from kvcake.methods.registry import build

HEADS, DIM, BLOCK, Q_HEADS = 2, 8, 4, 4


def _paged(blocks: int = 64) -> tuple[PagedLayer, torch.Tensor]:
    cache = torch.zeros(blocks, HEADS, BLOCK, 2 * DIM)
    table = torch.randperm(blocks)  # a request's blocks, in any order of the pool
    return PagedLayer(cache), table


def _key(position: int) -> torch.Tensor:
    """A key whose every number encodes its position and head, so a slot's content names its token."""
    return torch.arange(HEADS, dtype=torch.float32).view(HEADS, 1).expand(HEADS, DIM) + 1000.0 * position


def test_read_gives_back_what_write_stored_per_head():
    paged, table = _paged()
    slots = torch.tensor([[3, 9, 17], [5, 9, 30]])
    keys, values = torch.randn(HEADS, 3, DIM), torch.randn(HEADS, 3, DIM)
    paged.write(table, slots, keys, values)
    got_k, got_v = paged.read(table, slots)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    # the keys of a block and head are stored transposed ([D, block]), as vLLM's CPU kernel reads them
    block, offset = table[slots[0, 0] // BLOCK], slots[0, 0] % BLOCK
    raw = paged.keys.reshape(-1, HEADS, BLOCK * DIM)[block, 0].view(DIM, BLOCK)[:, offset]
    assert torch.equal(raw, keys[0, 0])


def test_logits_are_the_products_with_the_run_s_keys_and_give_attention_probs():
    """The decoding scores' attention, multiplied where vLLM stores the keys, is the attention over the run's keys."""
    paged, table = _paged()
    count, first = 4 * BLOCK + 3, 2
    slots = torch.arange(first * BLOCK, first * BLOCK + count).expand(HEADS, -1)
    paged.write(table, slots, torch.randn(HEADS, count, DIM), torch.randn(HEADS, count, DIM))
    query = torch.randn(Q_HEADS, DIM)
    keys, _ = paged.read(table, slots)  # the run's keys, slot by slot
    blocks = -(-count // BLOCK) + 2  # two blocks more than the run: padding of a batch, past the table's end
    ids = PagedRows.run_blocks([table], torch.tensor([first]), blocks)[0]
    assert torch.equal(ids, table[first: first + blocks])
    short = table[:5]  # rows of a batch with tables of different lengths, each padded with its own last block
    both = PagedRows.run_blocks([table, short], torch.tensor([len(table) - 2, 3]), 4)
    assert both.tolist() == [table[[-2, -1, -1, -1]].tolist(), short[[3, 4, 4, 4]].tolist()]
    logits = PagedRows([paged], [1]).logits(ids[None], query[None])[..., :count]
    groups = Q_HEADS // HEADS
    assert logits.shape == (1, HEADS, groups, 1, count)
    for head in range(Q_HEADS):  # query head h reads KV head h // groups, as vLLM groups them
        expected = keys[head // groups] @ query[head]
        torch.testing.assert_close(logits[0, head // groups, head % groups, 0], expected)
    probs = probs_from_logits(logits, 0.3, softcap=5.0)
    torch.testing.assert_close(probs, attention_probs(query.view(1, Q_HEADS, 1, DIM), keys[None], 0.3, softcap=5.0))


def test_gather_reads_whole_blocks_as_the_strided_views_do():
    paged, _ = _paged()
    paged.cache.copy_(torch.randn_like(paged.cache))
    ids = torch.tensor([[3, 9], [0, 63]])
    assert torch.equal(paged.gather(ids, 0), paged.keys[ids])
    assert torch.equal(paged.gather(ids, 1), paged.values[ids])


def test_top_positions_is_a_stable_top_k_in_position_order():
    ranked = torch.tensor([[0.5, 0.9, 0.5, 0.1, float("inf")], [1.0, 1.0, 1.0, 2.0, float("inf")]])
    assert top_positions(ranked, 3).tolist() == [[0, 1, 4], [0, 3, 4]]


def _prefilled(method, prompt: int, layers: int = 3, seed: int = 0) -> tuple[RequestState, list, list]:
    torch.manual_seed(seed)
    state = RequestState(method, prompt, layers, BLOCK)
    pages = [_paged() for _ in range(layers)]
    for layer, (paged, table) in enumerate(pages):
        keys = torch.stack([_key(p) for p in range(prompt)])  # (S, Hkv, D)
        keys = keys + 0.01 * torch.randn_like(keys)
        values = torch.randn(prompt, HEADS, DIM)
        paged.write(table, torch.arange(prompt).expand(HEADS, -1), keys.transpose(0, 1), values.transpose(0, 1))
        state.score_layer(layer, torch.randn(prompt, Q_HEADS, DIM), keys / 1000.0, values, 0.3, None)
    return state, [p for p, _ in pages], [t for _, t in pages]


def _check_region(state: RequestState, layers, tables) -> None:
    for region, paged, table in zip(state.regions, layers, tables, strict=True):
        assert region.positions is not None and region.positions.shape == (HEADS, region.count)
        keys, _ = paged.read(table, region.slots(BLOCK).expand(HEADS, -1))
        named = torch.round(keys[..., 0] / 1000.0).long()  # the position each slot's key encodes
        assert torch.equal(named, region.positions)
        assert (state.logical - region.count) // BLOCK == region.first_block


def test_compaction_keeps_the_top_scored_entries_at_the_start_of_the_region():
    method = build("cake", budget=12, window=2)
    state, layers, tables = _prefilled(method, 40)
    ranked = [r.clone() for r in state.ranked]
    firsts = state.compact(layers, tables)
    assert state.phase is Phase.DECODE
    counts = [r.count for r in state.regions]
    assert sum(counts) == 3 * 12  # the budget, spent exactly
    for region, rank, first in zip(state.regions, ranked, firsts, strict=True):
        assert region.first_block == first == (40 - region.count) // BLOCK
        assert torch.equal(region.positions, top_positions(rank, region.count))
    _check_region(state, layers, tables)


def test_decoding_holds_each_layer_at_its_target_and_moves_regions_on():
    method = build("cake", budget=12, window=2)
    state, layers, tables = _prefilled(method, 40)
    state.compact(layers, tables)
    moved_any = False
    for _ in range(3 * BLOCK + 1):
        position = state.logical
        for layer, (paged, table) in enumerate(zip(layers, tables, strict=True)):
            region = state.regions[layer]
            slot = region.next_slots(BLOCK, 1)  # where the backend writes the new token
            key = _key(position).unsqueeze(1)
            paged.write(table, slot.expand(HEADS, -1), key, torch.randn(HEADS, 1, DIM))
            state.decoded(layer, paged, table, torch.randn(1, Q_HEADS, DIM), 0.3, None)
            target = state.budget.decode_targets(position + 1)[0][layer]
            assert state.regions[layer].count == target
            assert int(state.regions[layer].positions.max()) == position  # the new token is kept (window)
        moved_any |= state.advance(layers, tables) is not None
        _check_region(state, layers, tables)
    assert moved_any


def test_without_decode_eviction_a_region_only_grows():
    method = build("snapkv", budget=12, window=2)
    state, layers, tables = _prefilled(method, 40)
    firsts = state.compact(layers, tables)
    for _ in range(2 * BLOCK):
        for layer, (paged, table) in enumerate(zip(layers, tables, strict=True)):
            state.decoded(layer, paged, table, torch.randn(1, Q_HEADS, DIM), 0.3, None)
        assert state.advance(layers, tables) is None
    assert [r.count for r in state.regions] == [12 + 2 * BLOCK] * 3
    assert [r.first_block for r in state.regions] == firsts


@pytest.mark.parametrize("name, options", [("cake", {}), ("h2o", {"decode_eviction": True}),
                                           ("knorm", {"decode_eviction": True}), ("tova", {}),
                                           ("streamingllm", {"decode_eviction": True})])
def test_a_batch_of_requests_decodes_as_each_request_alone(name, options):
    """decode_layers pads every layer of requests of different lengths into one batch, after the last layer, as
    the backend runs it: every region ends as when its request decodes alone, layer after layer, entry for
    entry."""
    method = build(name, budget=12, window=2, **options)
    prompts, layers = [40, 23, 57], 3
    alone = [_prefilled(method, prompt, layers, seed=i) for i, prompt in enumerate(prompts)]
    pool = [PagedLayer(torch.zeros(64 * len(prompts), HEADS, BLOCK, 2 * DIM)) for _ in range(layers)]
    order = torch.randperm(64 * len(prompts))
    batch = []  # the same requests, their blocks drawn from one pool per layer
    for i, (state, own, tables) in enumerate(alone):
        table = order[64 * i: 64 * (i + 1)]
        for layer in range(layers):
            keys, values = own[layer].read(tables[layer], torch.arange(prompts[i]).expand(HEADS, -1))
            pool[layer].write(table, torch.arange(prompts[i]).expand(HEADS, -1), keys, values)
        twin = RequestState(method, prompts[i], layers, BLOCK)
        twin.ranked, twin.raw, twin.budget = list(state.ranked), list(state.raw), copy.deepcopy(state.budget)
        batch.append((twin, [table] * layers))
    for (state, own, tables), (twin, table) in zip(alone, batch, strict=True):
        state.compact(own, tables)
        twin.compact(pool, table)
    generator = torch.Generator().manual_seed(1)
    for _ in range(BLOCK + 3):
        queries = torch.randn(layers, len(prompts), Q_HEADS, DIM, generator=generator)
        for layer in range(layers):
            for i, ((state, own, tables), (twin, table)) in enumerate(zip(alone, batch, strict=True)):
                key = _key(state.logical).unsqueeze(1)
                value = torch.full((HEADS, 1, DIM), float(state.logical))
                own[layer].write(tables[layer], state.regions[layer].next_slots(BLOCK, 1).expand(HEADS, -1), key,
                                 value)
                pool[layer].write(table[layer], twin.regions[layer].next_slots(BLOCK, 1).expand(HEADS, -1), key,
                                  value)
                state.decoded(layer, own[layer], tables[layer], queries[layer, i][None], 0.3, None)
        decode_layers([twin for twin, _ in batch], list(range(layers)), pool,
                      [[table[layer] for _, table in batch] for layer in range(layers)], list(queries), 0.3, None)
        for (state, own, tables), (twin, table) in zip(alone, batch, strict=True):
            state.advance(own, tables)
            twin.advance(pool, table)
            for region, other in zip(state.regions, twin.regions, strict=True):
                assert region.count == other.count and region.first_block == other.first_block
                assert torch.equal(region.positions, other.positions)
                assert (region.stored is None) == (other.stored is None)
                if region.stored is not None:
                    assert torch.equal(region.stored, other.stored)
            _check_region(twin, pool, table)


def _decoding_batch(method, requests: int, layers: int) -> tuple[list[RequestState], list[PagedLayer], list]:
    """``requests`` requests of ``layers`` layers, each layer with its own pool, compacted and one step into
    decoding."""
    pools = [PagedLayer(torch.randn(64 * requests, HEADS, BLOCK, 2 * DIM)) for _ in range(layers)]
    tables = [[torch.randperm(64 * requests)[:64] for _ in range(requests)] for _ in range(layers)]
    states = []
    for i in range(requests):
        state = RequestState(method, 40 + i, layers, BLOCK)
        for layer in range(layers):
            state.score_layer(layer, torch.randn(40 + i, Q_HEADS, DIM), torch.randn(40 + i, HEADS, DIM),
                              torch.randn(40 + i, HEADS, DIM), 0.3, None)
        state.compact(pools, [tables[layer][i] for layer in range(layers)])
        states.append(state)
    _step(states, pools, tables)
    return states, pools, tables


def _step(states, pools, tables, count=None) -> None:
    queries = [torch.randn(len(states), Q_HEADS, DIM) for _ in pools]
    with count or contextlib.nullcontext():
        decode_layers(states, list(range(len(pools))), pools, tables, queries, 0.3, None)
    for i, state in enumerate(states):
        state.advance(pools, [table[i] for table in tables])


@pytest.mark.parametrize("name, options", [("cake", {}), ("h2o", {"decode_eviction": True})])
def test_a_step_s_eviction_is_one_batch_over_layers_and_requests(name, options):
    """A step's eviction costs two copies per layer and request (its position and score tables into the padded
    batch) and a few operators per layer (gathering its keys, writing its cache); scoring, choosing and pairing the
    entries to move are one batch for every layer and request. Evicting each layer on its own cost 28 operators per
    request and ~90 per layer."""
    method = build(name, budget=12, window=2, **options)
    calls = {}
    for requests, layers in ((2, 2), (8, 2), (2, 6)):
        states, pools, tables = _decoding_batch(method, requests, layers)
        count = CountOperators()
        _step(states, pools, tables, count)
        assert all(region.count == state.budget.decode_targets(state.logical)[0][layer]
                   for state in states for layer, region in enumerate(state.regions))
        calls[requests, layers] = count.calls
    tables_copied = 2 if name == "h2o" else 1  # H2O's scores travel with the positions
    per_request = (calls[8, 2] - calls[2, 2]) / (6 * 2)
    per_layer = (calls[2, 6] - calls[2, 2]) / 4
    assert per_request <= 2 * tables_copied, calls
    assert per_layer <= 2 * 2 * tables_copied + 12, calls
