"""Allocation properties: exact, capped, never growing across cascade stages, equal to the definition."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvcake.methods.allocation import allocate, uniform
from reference import brute_force_allocation

prefs_strategy = st.lists(
    st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.sampled_from([0.0, 1.0, 2.0])),
    min_size=1, max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(prefs=prefs_strategy, total=st.integers(0, 400), cap=st.integers(0, 60))
def test_exact_sum_and_caps(prefs, total, cap):
    budgets = allocate(prefs, total, cap)
    assert len(budgets) == len(prefs)
    assert all(0 <= b <= cap for b in budgets)
    assert sum(budgets) == min(total, cap * len(prefs))


@settings(max_examples=200, deadline=None)
@given(prefs=prefs_strategy, total=st.integers(0, 200), cap=st.integers(0, 30))
def test_equals_the_definition(prefs, total, cap):
    assert allocate(prefs, total, cap) == brute_force_allocation(prefs, total, cap)


@settings(max_examples=300, deadline=None)
@given(prefs=prefs_strategy, total=st.integers(0, 400), cap=st.integers(0, 60))
@example(prefs=[0.0, 0.0, 0.0, 1.0], total=8, cap=4)  # zero preferences: once split evenly, then all to layer 0
def test_cascade_budgets_never_grow_and_end_at_one_shot(prefs, total, cap):
    previous = None
    for m in range(1, len(prefs) + 1):
        stage = allocate(prefs[:m], total, cap)
        if previous is not None:
            assert all(now <= before for now, before in zip(stage, previous, strict=False)), (previous, stage)
        previous = stage
    assert previous == allocate(prefs, total, cap)


@settings(max_examples=200, deadline=None)
@given(prefs=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=2, max_size=10),
       total=st.integers(0, 500))
def test_higher_preference_never_gets_less_when_uncapped(prefs, total):
    budgets = allocate(prefs, total, 10**6)
    for a in range(len(prefs)):
        for b in range(len(prefs)):
            if prefs[a] > prefs[b]:
                assert budgets[a] >= budgets[b]
    # Close to proportional: each layer within one token of its Webster quota bound.
    share = [p / sum(prefs) * total for p in prefs]
    assert all(abs(x - s) <= max(1.0, 0.5 * len(prefs)) for x, s in zip(budgets, share, strict=False))


def test_capped_layers_give_their_excess_to_the_others_in_proportion():
    # Layer 0 wants 90% of 100 tokens but can hold only 70: the other 30 go 1:3 to the rest.
    budgets = allocate([9.0, 0.25, 0.75], 100, 70)
    assert budgets == [70, 8, 22]


def test_uniform_and_covering_budget():
    assert uniform(4, 10, 100) == [3, 3, 2, 2]
    assert allocate([1, 2, 3], 1000, 50) == [50, 50, 50]


@pytest.mark.parametrize("bad", [[-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0]])
def test_bad_preferences_are_rejected(bad):
    with pytest.raises(ValueError):
        allocate(bad, 10, 10)
