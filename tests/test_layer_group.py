"""Decode-time eviction of every evicting layer in one batch per step (LayerGroup) leaves exactly the cache that
each layer evicting in its own call leaves: the same entries at the same slots, the same generated tokens, for
every method whose scorer allows it; and it costs a few operators per layer instead of some thirty."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.group import LayerGroup

BATCHED = [
    ("cake", {}),
    ("cake", {"pooling": "max"}),
    ("cake", {"decode_pooling": "outside-window"}),
    ("cake", {"window": 1}),
    ("tova", {}),
    ("snapkv", {"decode_eviction": True}),
    ("pyramidkv", {"decode_eviction": True}),
]


@contextlib.contextmanager
def _per_layer(monkeypatch):
    """Every layer evicts in its own call, as before layers were grouped."""
    with monkeypatch.context() as patch:
        patch.setattr(LayerGroup, "for_layers", classmethod(lambda cls, method, layers: None))
        yield


def _generate(model, method, ids, mask, steps):
    """Greedy decoding step by step; the tokens and, after every step, each layer's slot positions and counts."""
    with kvcake.compress(model, method) as press, torch.no_grad():
        cache = press.new_cache()
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        tokens, states = [], []
        grouped = None
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            logits = model(token, attention_mask=mask, cache=cache, position_ids=positions).logits[:, -1]
            grouped = cache.layer_group
            states.append([(layer.slots.positions.clone(), layer.slots.count.clone())
                           for layer in cache.layers_in_order()])
    return torch.cat(tokens, dim=1), states, grouped


@pytest.mark.parametrize(("name", "params"), BATCHED)
@pytest.mark.parametrize("batch", [1, 3])
def test_grouped_eviction_leaves_the_cache_of_per_layer_eviction(monkeypatch, name, params, batch):
    model = tiny_llama("sdpa", layers=5, seed=2)
    ids = prompt(70, batch=batch, seed=4)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :23] = 0  # a padded row: its slots start with free entries
        mask[2, :9] = 0
    params = {"budget": 14, **params}
    method = kvcake.build(name, **({"window": 4} | params))
    tokens, states, grouped = _generate(model, method, ids, mask, 24)
    assert grouped is not None and len(grouped.members) == 5  # the batched path really ran
    with _per_layer(monkeypatch):
        expected_tokens, expected_states, alone = _generate(model, method, ids, mask, 24)
    assert alone is None
    assert torch.equal(tokens, expected_tokens)
    for step, (got, expected) in enumerate(zip(states, expected_states, strict=True)):
        for layer, ((positions, count), (want_positions, want_count)) in enumerate(zip(got, expected, strict=True)):
            assert torch.equal(positions, want_positions), (step, layer)
            assert torch.equal(count, want_count), (step, layer)


def _swapped(model, method, ids, steps):
    """Decode ``steps`` tokens, swap the two rows in place (as beam search does), decode ``steps`` more."""
    with kvcake.compress(model, method) as press, torch.no_grad():
        cache = press.new_cache()
        token = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        for step in range(2 * steps):
            if step == steps:
                cache.reorder_cache(torch.tensor([1, 0]))
                token = token.flip(0)
            positions = torch.full((2, 1), ids.shape[1] + step)
            token = model(token, cache=cache, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)
        return token, [layer.slots.positions.clone() for layer in cache.layers_in_order()], cache.layer_group


def test_rows_moved_in_place_keep_the_position_order_right(monkeypatch):
    """Beam search reorders rows in place under the group's kept position order: it is sorted anew."""
    model = tiny_llama("sdpa", layers=3, seed=1)
    ids = torch.cat([prompt(50, seed=9), prompt(50, seed=10)])
    method = kvcake.CAKE(budget=12, window=4)
    token, positions, grouped = _swapped(model, method, ids, 12)
    assert grouped is not None
    with _per_layer(monkeypatch):
        expected_token, expected, _ = _swapped(model, method, ids, 12)
    assert torch.equal(token, expected_token)
    assert all(torch.equal(a, b) for a, b in zip(positions, expected, strict=True))


def test_layers_that_cannot_be_batched_evict_on_their_own():
    model = tiny_llama("sdpa")
    for method in (kvcake.build("h2o", budget=14), kvcake.build("streamingllm", budget=14),
                   kvcake.build("knorm", budget=14, decode_eviction=True), kvcake.build("snapkv", budget=14, window=4)):
        _, _, grouped = _generate(model, method, prompt(40), torch.ones(1, 40, dtype=torch.long), 2)
        assert grouped is None, method


class _Count(TorchDispatchMode):
    """Operators that compute (views left out)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not func.is_view
        return func(*args, **(kwargs or {}))


def _operators_per_step(model, method, steps=3):
    ids = prompt(60, seed=7)
    with kvcake.compress(model, method) as press, torch.no_grad():
        cache = press.new_cache()
        token = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        token = model(token, cache=cache, position_ids=torch.tensor([[60]])).logits[:, -1].argmax(-1, keepdim=True)
        with _Count() as count:
            for step in range(steps):
                out = model(token, cache=cache, position_ids=torch.tensor([[61 + step]]))
                token = out.logits[:, -1].argmax(-1, keepdim=True)
    return count.calls / steps


def test_grouped_eviction_costs_a_few_operators_per_layer(monkeypatch):
    """The operators a layer adds to a step, with decode-time eviction against without it: grouped, five (copying
    its probabilities and positions into the batch, its target, freeing its slot); on its own, about four times more."""
    def per_layer(decode_eviction):
        counts = [_operators_per_step(tiny_llama("sdpa", layers=n), kvcake.CAKE(budget=14, window=4,
                                                                                  decode_eviction=decode_eviction))
                  for n in (2, 6)]
        return (counts[1] - counts[0]) / 4

    plain = per_layer(False)
    grouped = per_layer(True) - plain
    with _per_layer(monkeypatch):
        alone = per_layer(True) - plain
    assert grouped <= 5, grouped
    assert alone >= 3 * grouped, (alone, grouped)  # measured: 21 and 5
