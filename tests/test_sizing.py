"""The engine's public sizing rules, which the batched evaluation counts each row's memory with, against the cache
itself: the decoding buffers a cache sizes for its answer, and a left-padded prefill recorded row by row."""

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.cache import KVCakeCache
from kvcake.engines.transformers.replay import record_prefill
from kvcake.engines.transformers.sizing import decode_capacity, entry_bytes, full_attention_only, row_plan
from kvcake.engines.transformers.storage import layer_kv_bytes


@pytest.mark.parametrize("method", [kvcake.CAKE(budget=24, window=4), kvcake.CAKE(budget=512, window=4),
                                    kvcake.SnapKV(budget=24, window=4), kvcake.H2O(budget=24)],
                         ids=["cake", "cake-covering", "snapkv", "h2o"])
def test_decode_capacity_is_what_the_cache_sizes(method):
    model = tiny_llama()
    ids = prompt(90)
    horizon = 7
    _, cache = record_prefill(model, ids, method)
    assert isinstance(cache, KVCakeCache)
    held = [layer.length for layer in cache.layers_in_order()]
    expected = decode_capacity(method, row_plan(cache.plan, 0), held, 0, horizon)
    cache.decode_horizon = horizon
    with kvcake.compress(model, method):
        model(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[90]]), cache=cache, use_cache=True)
    assert [layer.slots.capacity for layer in cache.layers_in_order()] == expected
    per_entry = [entry_bytes(layer) for layer in cache.layers_in_order()]
    assert [layer_kv_bytes(layer) for layer in cache.layers_in_order()] == [
        n * e for n, e in zip(expected, per_entry, strict=True)]


def test_a_left_padded_record_compresses_each_row_as_alone():
    model = tiny_llama()
    assert full_attention_only(model)
    method = kvcake.CAKE(budget=24, window=4)
    rows = [prompt(60, seed=3), prompt(45, seed=4)]
    ids = torch.zeros(2, 60, dtype=torch.long)
    mask = torch.zeros(2, 60, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 60 - r.shape[1]:], mask[i, 60 - r.shape[1]:] = r[0], 1
    batch, cache = record_prefill(model, ids, method, attention_mask=mask)
    for i, r in enumerate(rows):
        alone, own = record_prefill(model, r, method)
        assert torch.allclose(batch.logits[i], alone.logits[0], atol=1e-4)
        assert cache.report().kept_after_prefill[i] == own.report().kept_after_prefill[0]
