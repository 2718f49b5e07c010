"""The operators of a decoding step over fixed-shape slots give, bit for bit, what the general functions give:
the attention over the slots (kvcake.methods.attention.attention_probs with the free slots masked) and the lowest
entry outside the window (the argmin over every entry with the protected ones at +inf)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcake.engines.transformers.ops import slot_probs
from kvcake.methods.attention import attention_probs
from kvcake.methods.decoding import lowest_candidate


def _positions(batch, heads, capacity, free, seed):
    """Distinct positions in a random slot order, ``free`` random slots of each row and head at -1."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch * heads):
        row = torch.randperm(capacity, generator=g) + 5
        row[torch.randperm(capacity, generator=g)[:free]] = -1
        rows.append(row)
    return torch.stack(rows).view(batch, heads, capacity)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), capacity=st.integers(2, 70),
       softcap=st.sampled_from([None, 5.0]), seed=st.integers(0, 1000))
def test_slot_probs_are_attention_probs_bit_for_bit(batch, kv_heads, groups, capacity, softcap, seed):
    g = torch.Generator().manual_seed(seed)
    free = seed % capacity  # at least one slot holds a token (the newest always does)
    positions = _positions(batch, kv_heads, capacity, free, seed)
    query = torch.randn(batch, kv_heads * groups, 1, 16, generator=g)
    keys = torch.randn(batch, kv_heads, capacity, 16, generator=g) * 3
    expected = attention_probs(query, keys, 0.25, (positions >= 0)[:, :, None, None, :], softcap, check=False)
    got = slot_probs(query, keys, positions, 0.25, softcap)
    assert torch.equal(got.reshape(expected.shape), expected)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_the_lowest_candidate_is_the_argmin_with_the_protected_entries_at_infinity(data):
    capacity = data.draw(st.integers(1, 30))
    window = data.draw(st.integers(0, capacity + 2))
    values = data.draw(st.lists(st.integers(0, 3), min_size=capacity, max_size=capacity))
    held = data.draw(st.lists(st.booleans(), min_size=capacity, max_size=capacity))
    scores = torch.tensor(values, dtype=torch.float32).view(1, 1, -1)
    occupied = torch.tensor(held).view(1, 1, -1)
    protected = ~occupied | (torch.arange(capacity) >= capacity - window)
    expected = scores.masked_fill(protected, float("inf")).argmin(dim=-1, keepdim=True)
    assert torch.equal(lowest_candidate(scores, occupied, window), expected)
