"""One prefill, many methods: a replayed cache is the cache a compressed forward leaves, and greedy decoding from it
(kvcake.eval.runner.greedy, the harness's loop) equals ``generate`` under that method."""

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.replay import queries_needed, record_prefill, replay
from kvcake.eval.runner import feed, greedy
from kvcake.methods import registry
from test_families import tiny_model

METHODS = registry.method_names()  # every registered method (and the full cache)


def _same_cache(a, b) -> None:
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers, strict=False):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        px, py = getattr(x, "positions", None), getattr(y, "positions", None)
        assert (px is None and py is None) or torch.equal(px, py)


def _generate(model, ids, method, n):
    settings = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    if method is None:
        return model.generate(ids, **settings)[0, ids.shape[1]:].tolist()
    with kvcake.compress(model, method):
        return model.generate(ids, **settings)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", METHODS)
def test_replay_equals_compressed_forward_and_generate(name, backend):
    model = tiny_llama(backend)
    ids = prompt(80)
    record, _ = record_prefill(model, ids, registry.build("cake", budget=40))
    method = registry.build(name, budget=40)
    cache = replay(model, record, method)
    if method is not None:
        _, direct = record_prefill(model, ids, method)
        _same_cache(direct, cache)
        assert cache.report().kept_after_prefill == direct.report().kept_after_prefill
    tokens = greedy(model, cache, record.logits, ids.shape[1], method, 12, eos=[])
    assert tokens == _generate(model, ids, method, 12)


def test_replay_keeps_sliding_window_layers():
    model = tiny_model("gemma3", "sdpa")
    ids = torch.randint(3, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    record, _ = record_prefill(model, ids, registry.build("snapkv", budget=20, window=8))
    method = registry.build("cake", budget=20, window=8)
    _, direct = record_prefill(model, ids, method)
    _same_cache(direct, replay(model, record, method))
    tokens = greedy(model, replay(model, record, method), record.logits, ids.shape[1], method, 8, eos=[])
    assert tokens == _generate(model, ids, method, 8)


def test_greedy_stops_at_eos_and_cap():
    model = tiny_llama("sdpa")
    ids = prompt(40)
    record, cache = record_prefill(model, ids, None)
    free = greedy(model, cache, record.logits, ids.shape[1], None, 10, eos=[])
    record, cache = record_prefill(model, ids, None)
    stopped = greedy(model, cache, record.logits, ids.shape[1], None, 10, eos=[free[3]])
    assert stopped == free[: free.index(free[3])]
    assert len(free) == 10


def test_question_after_compressed_context_with_covering_budget_is_the_full_cache():
    """Query-agnostic path: feeding the question onto a cache whose budget covers the context equals the full cache."""
    model = tiny_llama("sdpa")
    context, question = prompt(60), prompt(9, seed=4)
    record, _ = record_prefill(model, context, registry.build("cake", budget=64))
    full = replay(model, record, None)
    kept = replay(model, record, registry.build("cake", budget=64))
    a = feed(model, full, question, 60, None)
    b = feed(model, kept, question, 60, registry.build("cake", budget=64))
    assert torch.equal(a, b)
    whole = model(torch.cat([context, question], 1)).logits[:, -1]
    torch.testing.assert_close(a, whole, atol=1e-5, rtol=1e-5)


def test_a_record_of_the_window_queries_replays_window_methods_exactly():
    """Keeping only the last ``window`` queries per layer is enough for every scorer that reads the window."""
    model = tiny_llama("sdpa")
    ids = prompt(80)
    names = ["cake", "snapkv", "pyramidkv", "tova", "streamingllm", "ada-snapkv", "uniform-cake"]
    methods = [registry.build(n, budget=40) for n in names]
    assert queries_needed(methods) == 32
    assert queries_needed(methods + [registry.build("h2o", budget=40)]) is None  # H2O sums every query's attention
    record, _ = record_prefill(model, ids, methods[0], queries=queries_needed(methods))
    assert all(layer.query.shape[2] == 32 for layer in record.layers.values())
    for method in methods:
        _, direct = record_prefill(model, ids, method)
        _same_cache(direct, replay(model, record, method))
