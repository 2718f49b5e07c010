"""KNorm and Expected Attention through the kvcake engine, composed with every allocator: the invariant matrix.

Each scorer is checked against an independent, deliberately simple float64 reference (the key norms of the full
cache; Expected Attention from the pre-RoPE queries captured at ``q_proj`` and explicit RoPE rotation matrices).
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.replay import record_prefill, replay
from kvcake.engines.transformers.rope import Rotary
from kvcake.methods.expected_attention import rotate_half, unrotate
from kvcake.methods.registry import build
from test_methods import (
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    OBSERVATION,
    check_decoding_against_reference,
    prefill,
    reference_budgets,
)

Q_HEADS = 4
SCORERS = ["knorm", "expected-attention"]
ALLOCATORS = ["uniform", "pyramid", "preference", "adakv"]
MATRIX = [(s, a) for s in SCORERS for a in ALLOCATORS]
#: The method of tests/test_methods.py whose layer split each allocator reproduces (for ``reference_budgets``).
SPLIT_AS = {"uniform": "snapkv", "pyramid": "pyramidkv", "preference": "cake", "adakv": "ada-snapkv"}


def scorer(name):
    return kvcake.KNormScores() if name == "knorm" else kvcake.ExpectedAttentionScores()


def make(scorer_name, allocator, budget, **kw):
    """``scorer_name`` composed with ``allocator``; the observation window of test_methods (CAKE's preference reads
    it); prefill-only unless asked."""
    kw.setdefault("window", OBSERVATION)
    kw.setdefault("decode_eviction", False)
    s = scorer(scorer_name)
    if allocator == "uniform":
        return kvcake.Method(budget=budget, scorer=s, **kw)
    if allocator == "pyramid":
        return kvcake.Method(budget=budget, scorer=s, allocator=kvcake.Pyramid(), **kw)
    if allocator == "preference":
        return kvcake.CAKE(budget=budget, scorer=s, **kw)
    if allocator == "adakv":
        return kvcake.AdaKV(kvcake.Method(budget=budget, scorer=s, **kw))
    raise KeyError(allocator)


# -- independent references --------------------------------------------------------------------------------------

def full_prefill(model, ids):
    """Pre-RoPE queries per layer ``(B, Hq, S, D)`` (captured at q_proj), the full cache and eager attentions."""
    captured = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    batch, seq = ids.shape
    queries = {i: q.view(batch, seq, Q_HEADS, HEAD_DIM).transpose(1, 2) for i, q in captured.items()}
    return queries, out.past_key_values, out.attentions


def rope_matrix(position, theta, dim):
    """The RoPE rotation at ``position`` as an explicit ``dim x dim`` float64 matrix (pairs i, i + dim/2)."""
    r = torch.zeros(dim, dim, dtype=torch.float64)
    half = dim // 2
    for i in range(half):
        angle = position * theta ** (-2 * i / dim)
        c, s = math.cos(angle), math.sin(angle)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def expected_attention_reference(q, keys, values, theta, n_future=512, n_sink=4):
    """kvpress 0.5.5's Expected Attention for one row: ``q`` ``(Hq, S, D)`` pre-RoPE, keys/values ``(Hkv, S, D)``."""
    q_heads, seq, dim = q.shape
    kv_heads = keys.shape[0]
    groups = q_heads // kv_heads
    rbar = sum(rope_matrix(t, theta, dim) for t in range(seq, seq + n_future)) / n_future
    q, keys, values = q.double(), keys.double(), values.double()
    scores = torch.zeros(kv_heads, seq, dtype=torch.float64)
    for h in range(q_heads):
        stats = q[h, n_sink:]
        mean = stats.mean(0)
        cov = (stats - mean).T @ (stats - mean) / stats.shape[0]
        mean, cov = rbar @ mean, rbar @ cov @ rbar.T
        k = keys[h // groups, n_sink:]
        logits = k @ mean / math.sqrt(dim) + ((k @ cov) * k).sum(-1) / (2 * dim)
        scores[h // groups, n_sink:] += torch.softmax(logits, dim=0) / groups
    scores[:, n_sink:] *= values[:, n_sink:].norm(dim=-1)
    scores[:, :n_sink] = scores[:, n_sink:].max() + 1
    return scores


def reference_scores(name, model, queries, cache, layer, row=0):
    keys, values = cache.layers[layer].keys[row], cache.layers[layer].values[row]
    if name == "knorm":
        return -keys.double().pow(2).sum(-1).sqrt()
    theta = model.config.rope_parameters["rope_theta"]
    return expected_attention_reference(queries[layer][row], keys, values, theta)


def assert_top_scored(positions, scores, protected, share, alpha=None):
    """Per KV head of one row: the protected positions are kept, and the others kept outscore every evicted one;
    with Ada-KV (``alpha``) each head keeps its floor and the rest went to the best scores of any head."""
    seq = scores.shape[-1]
    finite = scores[:, : seq - len(protected)]
    tol = 1e-6 * float(finite[finite < finite.max()].abs().max())
    chosen_all, evicted_all = [], []
    for head in range(scores.shape[0]):
        kept = [p for p in positions[head].tolist() if p >= 0]
        assert kept == sorted(kept) and set(protected) <= set(kept)
        chosen = [p for p in kept if p not in protected]
        evicted = sorted(set(range(seq)) - set(kept))
        if chosen and evicted:
            assert float(scores[head, chosen].min()) >= float(scores[head, evicted].max()) - tol, head
        chosen_all.append(chosen)
        evicted_all.append(evicted)
    if alpha is None:
        assert all(len(c) == share for c in chosen_all)
        return
    floor = int(alpha * share)
    assert sum(len(c) for c in chosen_all) == share * scores.shape[0]
    assert all(len(c) >= floor for c in chosen_all)
    beyond = [x for h, c in enumerate(chosen_all) for x in sorted(scores[h, c].tolist(), reverse=True)[floor:]]
    worst_evicted = max(float(scores[h, e].max()) for h, e in enumerate(evicted_all) if e)
    if beyond:
        assert min(beyond) >= worst_evicted - tol


# -- the matrix ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, allocator", MATRIX)
def test_kept_positions_are_the_top_scored_and_budgets_are_exact(name, allocator):
    model = tiny_llama("eager")
    seq, budget = 150, 30
    ids = prompt(seq)
    queries, full, attentions = full_prefill(model, ids)
    method = make(name, allocator, budget)
    _, cache, report = prefill(model, ids, method)
    window = method.window
    budgets = reference_budgets(SPLIT_AS[allocator], attentions, (budget - window) * LAYERS, seq - window, None)
    assert [b + window for b in budgets] == report.budgets[0] == report.kept_after_prefill[0]
    assert sum(report.kept_after_prefill[0]) == budget * LAYERS
    if allocator == "pyramid":
        assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    protected = list(range(seq - window, seq))
    for layer, share in enumerate(budgets):
        scores = reference_scores(name, model, queries, full, layer)
        positions = cache.layers[layer].position_table()[0]
        assert_top_scored(positions, scores, protected, share, method.head_alpha)
    per_entry = KV_HEADS * 2 * HEAD_DIM * 4
    if allocator == "adakv":
        assert report.kv_bytes == report.padding_bytes + sum(report.kept_after_prefill[0]) * per_entry
    else:
        assert report.kv_bytes == sum(report.kept_after_prefill[0]) * per_entry  # evicted entries are freed


@pytest.mark.parametrize("name, allocator", MATRIX)
def test_cascade_equals_one_shot(name, allocator):
    model = tiny_llama("sdpa")
    ids = prompt(160)
    _, cascade, rc = prefill(model, ids, make(name, allocator, 28))
    _, oneshot, ro = prefill(model, ids, make(name, allocator, 28, cascade=False))
    assert rc.budgets == ro.budgets
    for i in range(LAYERS):
        assert torch.equal(cascade.layers[i].position_table(), oneshot.layers[i].position_table())
    assert ro.peak_kv_bytes == ro.kv_bytes_full
    assert rc.peak_kv_bytes < ro.peak_kv_bytes


@pytest.mark.parametrize("name, allocator", MATRIX)
def test_prefill_is_exact_and_a_covering_budget_changes_nothing(name, allocator, backend):
    model = tiny_llama(backend)
    ids = prompt(70)
    full_logits = model(ids).logits
    out, _, _ = prefill(model, ids, make(name, allocator, 24))
    assert torch.equal(out.logits, full_logits)
    full = model.generate(ids, max_new_tokens=10, do_sample=False)
    with kvcake.compress(model, make(name, allocator, 90)) as press:
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, full)
    assert press.report.kept_after_prefill == [[70] * LAYERS]


@pytest.mark.parametrize("name, allocator", MATRIX)
def test_decoding_equals_reference_batch_and_padding(name, allocator, backend):
    check_decoding_against_reference(tiny_llama(backend), make(name, allocator, 26))


@pytest.mark.parametrize("name", SCORERS)
def test_a_padded_row_is_scored_like_the_same_prompt_alone(name):
    """Padding is neither a sink, nor a query of the statistics, nor a scored key: a left-padded row (with the
    positions generate gives it) keeps the top-scored tokens of the same prompt run alone."""
    model = tiny_llama("eager")
    alone = prompt(69, seed=4)
    pad = 31
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), alone], dim=1)
    ids = torch.cat([prompt(100, seed=5), ids], dim=0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    method = make(name, "uniform", 20)
    with kvcake.compress(model, method) as press, torch.no_grad():
        model(ids, attention_mask=mask, position_ids=position_ids)
        cache = press.cache
    queries, full, _ = full_prefill(model, alone)
    protected = list(range(69 - method.window, 69))
    for layer in range(LAYERS):
        positions = cache.layers[layer].position_table()[1]
        shifted = torch.where(positions >= 0, positions - pad, positions)
        assert int((positions[positions >= 0] < pad).sum()) == 0  # no padding kept
        assert_top_scored(shifted, reference_scores(name, model, queries, full, layer), protected,
                          20 - method.window)


# -- KNorm while decoding: keys in slot order ------------------------------------------------------------------------

def _knorm_decode_violations(scorer, steps=30):
    """Decode with KNorm eviction; count the steps where a layer head dropped anything but the highest-norm key
    outside the window (norms read from the entries in position order). Also returns whether the layers decoded in
    their fixed-shape slots (where keys sit in slot order)."""
    model = tiny_llama("sdpa", layers=2)
    seq, window = 64, 4
    ids = prompt(seq)
    method = kvcake.Method(budget=20, window=window, scorer=scorer, decode_eviction=True)
    violations, saw_slot_order = 0, False
    with kvcake.compress(model, method) as press, torch.no_grad():
        cache = press.new_cache()
        token = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        for step in range(steps):
            before = [layer.entries() for layer in cache.layers]
            saw_slot_order |= any(layer.slots is not None for layer in cache.layers)
            logits = model(token, cache=cache, position_ids=torch.tensor([[seq + step]])).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            for i, layer in enumerate(cache.layers):
                keys, _, positions = before[i]
                after = layer.position_table()[0]
                for h in range(KV_HEADS):
                    entries = positions[0, h].tolist()
                    removed = sorted((set(entries) | {seq + step}) - set(after[h].tolist()))
                    assert len(removed) == 1 and after.shape[-1] == 20
                    candidates = len(entries) + 1 - window  # the window includes the new token
                    norms = keys[0, h, :candidates].double().norm(dim=-1)
                    dropped = norms[entries.index(removed[0])] if removed[0] in entries[:candidates] else -1.0
                    # A repeated token has the same key norm at every position in the first layer (RoPE keeps
                    # norms): ties within float32 rounding may go either way.
                    violations += int(float(dropped) < float(norms.max()) * (1 - 1e-6))
    return violations, saw_slot_order


def test_knorm_decode_drops_the_highest_key_norm_with_keys_in_slot_order():
    violations, saw_slot_order = _knorm_decode_violations(kvcake.KNormScores())
    assert saw_slot_order, "the test must exercise keys stored in slot order"
    assert violations == 0


def test_cake_knorm_holds_the_budget_while_decoding():
    model = tiny_llama("sdpa", layers=2)
    ids = prompt(64)
    with kvcake.compress(model, build("cake-knorm", budget=20, window=OBSERVATION)) as press:
        out = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False)
        report = press.report
        lengths = [layer.length for layer in press.cache.layers]
    assert out.shape[1] == 124
    assert report.kept_now == report.budgets and lengths == report.budgets[0]
    assert sum(report.budgets[0]) == 40


# -- Expected Attention: RoPE, replay, prefill-only ------------------------------------------------------------------

ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
]


@pytest.mark.parametrize("rope", ROPES, ids=[r["rope_type"] for r in ROPES])
def test_rotary_tables_are_the_models_and_unrotate_inverts_rope(rope):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, rope_parameters=rope)
    model = LlamaForCausalLM(cfg).eval()
    positions = torch.arange(0, 300).view(1, -1)
    cos, sin = Rotary(model.model.layers[0].self_attn)(positions)
    own_cos, own_sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, own_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, own_sin, rtol=0, atol=0)
    x = torch.randn(1, 4, 300, 16, dtype=torch.float64)
    rotated = x * cos[:, None].double() + rotate_half(x) * sin[:, None].double()
    torch.testing.assert_close(unrotate(rotated, cos[:, None].double(), sin[:, None].double()), x)


def test_replay_of_expected_attention_equals_the_compressed_prefill():
    model = tiny_llama("sdpa")
    ids = prompt(120)
    method = kvcake.ExpectedAttention(budget=30)
    record, _ = record_prefill(model, ids, build("snapkv", budget=40, window=8))
    replayed = replay(model, record, method)
    _, cache, _ = prefill(model, ids, method)
    for i in range(LAYERS):
        assert torch.equal(replayed.layers[i].position_table(), cache.layers[i].position_table())


def test_defaults_and_registry():
    knorm, ea = build("knorm", budget=64), build("expected-attention", budget=64)
    assert isinstance(knorm, kvcake.KNorm) and knorm.window == 1 and not knorm.decode_eviction
    assert isinstance(ea, kvcake.ExpectedAttention) and ea.window == 1 and not ea.decode_eviction
    assert ea.scorer == kvcake.ExpectedAttentionScores(n_future_positions=512, n_sink=4, use_covariance=True,
                                                       use_vnorm=True, epsilon=0.0)
    assert build("expected-attention", budget=64, n_sink=2).scorer.n_sink == 2
    assert build("cake-knorm", budget=64).label == "cake[scorer=knorm]"
    assert build("cake-knorm", budget=64).decode_eviction  # CAKE's default, KNorm has a decode rule
    cake_ea = build("cake-expected-attention", budget=64)
    assert cake_ea.label == "cake[scorer=expected-attention]" and not cake_ea.decode_eviction
    assert kvcake.AdaKV(kvcake.KNorm(budget=64)).label == "ada-knorm"


@pytest.mark.parametrize("factory, message", [
    (lambda: kvcake.ExpectedAttention(budget=64, decode_eviction=True), "prefill only"),
    (lambda: build("cake-expected-attention", budget=64, decode_eviction=True), "prefill only"),
    (lambda: kvcake.CAKE(budget=64, scorer=kvcake.ExpectedAttentionScores()), "prefill only"),
    (lambda: kvcake.ExpectedAttention(budget=64, n_future_positions=0), "n_future_positions"),
    (lambda: kvcake.ExpectedAttention(budget=64, n_sink=-1), "n_sink"),
    (lambda: kvcake.ExpectedAttention(budget=64, epsilon=float("nan")), "epsilon"),
    (lambda: build("knorm", budget=64, kernel=3), "no parameter"),
])
def test_bad_parameters_give_clear_errors(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()
