"""The tensor allocation equals the host one row by row, bit for bit, and runs as one compiled graph."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvcake.methods.allocation import _count_at_least, allocate, allocate_tensor

TINY = 2.2250738585072014e-308  # smallest normal double
HUGE = 1.7976931348623157e308  # largest double: its first bid, 2P, overflows to inf

special = st.sampled_from([0.0, -0.0, 1.0, 2.0, 3.0, 0.5, 1e-300, 1e300, 5e-324, 3e-320, TINY, HUGE])
preference = st.one_of(special, st.floats(min_value=0, max_value=HUGE, allow_nan=False, allow_infinity=False),
                       st.floats(min_value=0, max_value=10, allow_nan=False))
cap = st.one_of(st.integers(0, 200), st.integers(0, 4), st.just(100000))


@st.composite
def batches(draw, max_rows=4, max_layers=10):
    rows = draw(st.integers(1, max_rows))
    layers = draw(st.integers(1, max_layers))
    prefs = []
    for _ in range(rows):
        kind = draw(st.sampled_from(["any", "zero", "equal"]))
        if kind == "any":
            prefs.append(draw(st.lists(preference, min_size=layers, max_size=layers)))
        else:
            prefs.append([0.0 if kind == "zero" else draw(preference)] * layers)
    caps = [draw(st.lists(cap, min_size=layers, max_size=layers)) for _ in range(rows)]
    totals = [draw(st.one_of(st.integers(0, sum(c) + 5), st.integers(0, 40))) for c in caps]
    return prefs, totals, caps


@settings(max_examples=80, deadline=None)
@given(pref=preference, cap=st.one_of(st.integers(0, 300), st.just(131040)), data=st.data())
def test_count_of_bids_at_least_a_value_is_exact(pref, cap, data):
    # The primitive everything rests on, against the bids enumerated: at the bids themselves and their neighbouring
    # doubles (where a wrong estimate of the run's end shows), and at arbitrary values.
    # (Python's division: torch's `float / tensor` multiplies by a rounded reciprocal.)
    bids = [pref / (k + 0.5) for k in range(cap)]
    values = [0.0, math.inf, 5e-324, data.draw(st.floats(min_value=0, allow_nan=False))]
    for k in data.draw(st.lists(st.integers(0, max(cap - 1, 0)), max_size=8)) if cap else []:
        values += [bids[k], math.nextafter(bids[k], 0), math.nextafter(bids[k], math.inf)]
    v = torch.tensor(values, dtype=torch.float64)
    want = (torch.tensor(bids, dtype=torch.float64)[None, :] >= v[:, None]).sum(-1)
    got = _count_at_least(torch.full_like(v, pref), v, torch.full(v.shape, cap))
    assert got.tolist() == want.tolist()


def host(prefs, totals, caps):
    return [allocate(p, t, c) for p, t, c in zip(prefs, totals, caps, strict=True)]


def on_tensors(prefs, totals, caps):
    return allocate_tensor(torch.tensor(prefs, dtype=torch.float64), torch.tensor(totals), torch.tensor(caps))


@settings(max_examples=150, deadline=None)
@given(batch=batches())
@example(batch=([[0.0, 0.0, 0.0]], [4], [[5, 5, 5]]))  # all zero: round robin from layer 0
@example(batch=([[1.0, 3.0]], [3], [[10, 10]]))  # 1/0.5 == 3/1.5: the equal bid goes to the smaller k
@example(batch=([[5e-324, 0.0, 1e-323]], [5], [[9, 9, 9]]))  # subnormal bids round to 0 and tie with zeros
@example(batch=([[HUGE, HUGE, 1.0]], [1], [[3, 3, 3]]))  # two infinite first bids
@example(batch=([[1e300, 1e-300, 0.0]], [7], [[100000, 100000, 100000]]))
@example(batch=([[2.0, 1.0], [0.0, 0.0]], [0, 9], [[0, 3], [4, 4]]))
# Subnormal thresholds: a bid's rounding moves it by half a spacing of 2**-1074, far from P / v - 1/2.
@example(batch=([[4.0676e-320, 1e-315, 1e-310, 0.0]], [226084], [[100000] * 4]))
@example(batch=([[2.174763e-318, 3e-320, 3.114654e-318]], [78482], [[100000, 100000, 33]]))
def test_equals_the_host_allocation_row_by_row(batch):
    prefs, totals, caps = batch
    got = on_tensors(prefs, totals, caps)
    assert got.dtype == torch.int64 and got.shape == (len(prefs), len(prefs[0]))
    assert got.tolist() == host(prefs, totals, caps)
    # Exact and capped, whatever the preferences.
    assert (got >= 0).all() and (got <= torch.tensor(caps)).all()
    assert got.sum(-1).tolist() == [min(t, sum(c)) for t, c in zip(totals, caps, strict=True)]


@settings(max_examples=40, deadline=None)
@given(batch=batches(max_rows=3, max_layers=8))
def test_cascade_prefixes_equal_the_host_and_never_grow(batch):
    prefs, totals, caps = batch
    previous = None
    for m in range(1, len(prefs[0]) + 1):
        stage = on_tensors([p[:m] for p in prefs], totals, [c[:m] for c in caps])
        assert stage.tolist() == host([p[:m] for p in prefs], totals, [c[:m] for c in caps])
        if previous is not None:
            assert (stage[:, :-1] <= previous).all()
        previous = stage


@settings(max_examples=60, deadline=None)
@given(prefs=st.lists(preference, min_size=1, max_size=8), cap=st.one_of(st.integers(0, 60), st.just(100000)),
       totals=st.lists(st.integers(0, 300), min_size=1, max_size=4))
def test_one_cap_per_row_or_for_all_and_an_int_total(prefs, cap, totals):
    rows = len(totals)
    p = torch.tensor([prefs] * rows, dtype=torch.float64)
    want = [allocate(prefs, t, cap) for t in totals]
    assert allocate_tensor(p, torch.tensor(totals), cap).tolist() == want
    assert allocate_tensor(p, torch.tensor(totals), torch.tensor([cap] * rows)).tolist() == want
    assert allocate_tensor(p, totals[0], cap).tolist() == [want[0]] * rows


def test_known_answers():
    f = torch.float64
    assert allocate_tensor(torch.tensor([[9.0, 0.25, 0.75]], dtype=f), 100, 70).tolist() == [[70, 8, 22]]
    assert allocate_tensor(torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=f), 10, 100).tolist() == [[3, 3, 2, 2]]
    assert allocate_tensor(torch.tensor([[1.0, 2.0, 3.0]], dtype=f), 1000, 50).tolist() == [[50, 50, 50]]
    assert allocate_tensor(torch.tensor([[4.0]], dtype=f), 7, 5).tolist() == [[5]]
    assert allocate_tensor(torch.tensor([[4.0]], dtype=f), 3, 5).tolist() == [[3]]
    # Negative caps count as 0, as on the host.
    assert allocate_tensor(torch.tensor([[1.0, 1.0]], dtype=f), 3, torch.tensor([[-2, 5]])).tolist() == [[0, 3]]


def test_large_caps_and_budget():
    g = torch.Generator().manual_seed(0)
    prefs = torch.rand(2, 32, generator=g, dtype=torch.float64)
    prefs[1, ::3] = 0.0
    caps, totals = 131072 - 32, [32 * 992, 5]
    got = allocate_tensor(prefs, torch.tensor(totals), caps)
    assert got.tolist() == [allocate(prefs[r].tolist(), totals[r], caps) for r in range(2)]


@pytest.mark.parametrize("args", [
    (torch.ones(3, dtype=torch.float64), 1, 1),  # not (B, L)
    (torch.ones(1, 3, dtype=torch.int64), 1, 1),  # integer preferences
    (torch.ones(1, 3, dtype=torch.float64), 1, torch.ones(1, 3)),  # float caps
    (torch.ones(2, 3, dtype=torch.float64), torch.tensor([1, 2, 3]), 1),  # total per row of the wrong length
    (torch.ones(2, 3, dtype=torch.float64), 1, torch.ones(2, 4, dtype=torch.int64)),  # caps of the wrong shape
])
def test_bad_shapes_and_dtypes_are_rejected(args):
    with pytest.raises(ValueError):
        allocate_tensor(*args)


def allocate_tensor_wrapper(prefs, totals, caps):
    return allocate_tensor(prefs, totals, caps)


def test_compiles_to_one_graph_with_the_same_result():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    prefs = torch.tensor([[0.5, 0.0, 2.0, 1e-300, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    totals, caps = torch.tensor([9, 7]), torch.tensor([[3, 4, 0, 100000, 6], [2, 2, 2, 2, 2]])
    compiled = torch.compile(allocate_tensor_wrapper, fullgraph=True)
    got = compiled(prefs, totals, caps)
    assert not counters["graph_break"], dict(counters["graph_break"])
    want = [allocate(prefs[r].tolist(), int(totals[r]), caps[r].tolist()) for r in range(2)]
    assert got.tolist() == want == allocate_tensor(prefs, totals, caps).tolist()
    torch._dynamo.reset()
