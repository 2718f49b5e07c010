"""The budget policy and the decode-time drop rule on their own: pure torch, no model, no transformers."""

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcake
from kvcake.methods.allocation import allocate
from kvcake.methods.budget import RequestBudget
from kvcake.methods.decoding import select_drops


def hand_in(plan: RequestBudget, preference: list[float] | None) -> bool:
    """One layer through the path the engine runs: push its preference as a tensor; when the seen layers are evicted,
    read their shares back from the device split; after the last layer, bring the preferences to the host."""
    column = None if preference is None else torch.tensor(preference, dtype=torch.float64)
    evicts = plan.push(column, torch.device("cpu"))
    if evicts:
        plan.set_shares(plan.device_shares().tolist())
    if plan.layers_handed_in == plan.num_layers:
        plan.finish_device()
    return evicts


def test_the_policy_layer_imports_no_transformers():
    assert "transformers" not in {m.split(".")[0] for m in sys.modules if m.startswith("kvcake.methods")}
    import kvcake.methods.budget as budget

    assert not any(name.startswith("transformers") for name in vars(budget))


@settings(max_examples=60, deadline=None)
@given(prefs=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=8), prompt=st.integers(9, 200),
       budget=st.integers(8, 120))
def test_the_cascade_shrinks_shares_and_ends_at_the_one_shot_split(prefs, prompt, budget):
    method = kvcake.CAKE(budget=budget, window=8)
    plan = RequestBudget(method, len(prefs), [prompt], prompt)
    history = []
    for p in prefs:
        assert hand_in(plan, [p]) is True  # the cascade evicts after every layer
        history.append(list(plan.shares[0]))
    for before, after in zip(history, history[1:], strict=False):
        assert all(a <= b for a, b in zip(after, before, strict=False)), "a share grew between cascade stages"
    total = (budget - 8) * len(prefs)
    assert plan.shares[0] == allocate(prefs, total, prompt - 8)
    assert sum(plan.shares[0]) == min(total, (prompt - 8) * len(prefs))
    assert plan.budgets()[0] == [s + 8 for s in plan.shares[0]]


def test_one_shot_waits_for_the_last_layer():
    plan = RequestBudget(kvcake.CAKE(budget=16, window=4, cascade=False), 3, [50], 50)
    assert [hand_in(plan, [w]) for w in (1.0, 2.0, 3.0)] == [False, False, True]
    assert plan.shares[0] == allocate([1.0, 2.0, 3.0], 36, 46)


def test_rows_are_budgeted_alone_and_fixed_weights_split_over_all_layers():
    plan = RequestBudget(kvcake.PyramidKV(budget=20, window=4), 4, [100, 30], 100)
    hand_in(plan, None)
    weights = kvcake.Pyramid().weights(4)
    assert plan.shares == [allocate(weights, 64, 96)[:1], allocate(weights, 64, 26)[:1]]


def test_head_wise_counts_keep_each_heads_floor():
    method = kvcake.AdaKV(kvcake.SnapKV(budget=12, window=2), alpha=0.5)
    plan = RequestBudget(method, 1, [20], 20)
    hand_in(plan, None)
    ranked = torch.tensor([[[5.0] * 10 + [1.0] * 8 + [float("inf")] * 2, [0.0] * 18 + [float("inf")] * 2]])
    counts = plan.keep_counts(0, ranked)
    # Floors of 5 each; the other 10 go to the best scores (all head 0's); plus the 2-token window each.
    assert counts.tolist() == [[17, 7]]


def test_the_decode_schedule_is_constant_for_long_prompts():
    plan = RequestBudget(kvcake.CAKE(budget=40, window=8), 3, [500], 500)
    for p in (1.0, 2.0, 3.0):
        hand_in(plan, [p])
    schedule = plan.decode_schedule(64)
    assert schedule.stable and schedule.steps == 1
    assert schedule.targets[0] == schedule.targets[1] == plan.budgets()
    assert [schedule.capacity(i, b) for i, b in enumerate(plan.budgets()[0])] == [b + 1 for b in plan.budgets()[0]]
    assert [schedule.max_drops(i) for i in range(3)] == [1, 1, 1]


def test_a_covering_budget_lets_layers_grow_until_the_budget_is_used():
    plan = RequestBudget(kvcake.CAKE(budget=72, window=8), 2, [60], 60)
    for p in (1.0, 5.0):
        hand_in(plan, [p])
    schedule = plan.decode_schedule(30)
    targets = [step[0] for step in schedule.targets]
    for t in range(13):  # prompt + answer within the budget: every layer holds every token
        assert targets[t] == [60 + t, 60 + t]
    assert sum(targets[-1]) == 72 * 2  # then the whole budget is held, split by preference
    for layer in range(2):  # the buffers hold the most a layer ever holds, plus the next token's slot
        assert schedule.capacity(layer, 60) == max(step[layer] for step in targets) + 1


def _occupied(capacity, free):
    mask = torch.ones(1, 1, capacity, dtype=torch.bool)
    mask[..., :free] = False
    return mask


def test_select_drops_takes_the_lowest_outside_the_window_earlier_on_ties():
    scores = torch.tensor([[[9.0, 3.0, 1.0, 1.0, 0.0, 0.0]]])
    occupied = _occupied(6, 1)  # slot 0 holds nothing: its score is ignored
    dropped = select_drops(scores, occupied, torch.tensor([[1]]), window=2, max_drops=1)
    assert dropped.tolist() == [[[False, False, True, False, False, False]]]  # 0.0s are the window; 1.0 tie: earlier
    two = select_drops(scores, occupied, torch.tensor([[2]]), window=2, max_drops=3)
    assert two.tolist() == [[[False, False, True, True, False, False]]]
    none = select_drops(scores, occupied, torch.tensor([[0]]), window=2, max_drops=3)
    assert not none.any()


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_select_drops_matches_a_sort_of_the_candidates(data):
    capacity = data.draw(st.integers(3, 20))
    free = data.draw(st.integers(0, capacity - 2))
    window = data.draw(st.integers(1, capacity - free))
    values = data.draw(st.lists(st.integers(0, 4), min_size=capacity, max_size=capacity))
    scores = torch.tensor(values, dtype=torch.float32).view(1, 1, -1)
    candidates = [i for i in range(free, capacity - window)]
    drops = data.draw(st.integers(0, len(candidates)))
    dropped = select_drops(scores, _occupied(capacity, free), torch.tensor([[drops]]), window, max(drops, 1))
    expected = sorted(candidates, key=lambda i: (values[i], i))[:drops]
    assert [i for i in range(capacity) if dropped[0, 0, i]] == sorted(expected)


def test_select_drops_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(select_drops, fullgraph=True)
    scores = torch.rand(2, 3, 17, generator=torch.Generator().manual_seed(0))
    occupied = torch.rand(2, 3, 17, generator=torch.Generator().manual_seed(1)) > 0.2
    drops = torch.tensor([[1], [0]])
    assert torch.equal(compiled(scores, occupied, drops, 4, 1), select_drops(scores, occupied, drops, 4, 1))
    assert not counters["graph_break"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_preference_is_an_error(bad):
    plan = RequestBudget(kvcake.CAKE(budget=16, window=4), 2, [40], 40)
    hand_in(plan, [bad])  # checked once, after the last layer (no host synchronisation per layer)
    with pytest.raises(kvcake.NonFiniteAttentionError):
        hand_in(plan, [1.0])


@settings(max_examples=40, deadline=None)
@given(prefs=st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.floats(0, 10, allow_nan=False)), min_size=1,
                      max_size=6), prompts=st.tuples(st.integers(9, 200), st.integers(9, 200)),
       budget=st.integers(8, 120), cascade=st.booleans())
def test_every_stage_the_engine_reads_back_is_the_host_split_row_by_row(prefs, prompts, budget, cascade):
    """The production path (push, device_shares, set_shares, finish_device) on two rows of different lengths: each
    stage's shares are the allocator's split of each row alone, and the last stage is the one-shot split."""
    plan = RequestBudget(kvcake.CAKE(budget=budget, window=8, cascade=cascade), len(prefs), list(prompts),
                         max(prompts))
    for m, layer in enumerate(prefs, start=1):
        evicts = hand_in(plan, list(layer))
        assert evicts == (cascade or m == len(prefs))
        if evicts:
            assert plan.shares == [plan.split([p[row] for p in prefs[:m]], plan.totals[row], plan.caps()[row])
                                   for row in range(2)]
    assert plan.preferences == [[p[row] for p in prefs] for row in range(2)]
    assert plan.decode_targets(max(prompts)) == plan.budgets() == plan.targets(0)[0]
