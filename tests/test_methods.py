"""Every method through the same cache, attachment and budgets: the invariant suite as a matrix on tiny models."""

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama
from kvcake.methods import registry
from kvcake.methods.cake import CakeScores, Preference
from kvcake.methods.h2o import H2OScores
from kvcake.methods.pyramidkv import Pyramid
from kvcake.methods.registry import build
from kvcake.methods.snapkv import SnapKVScores
from kvcake.methods.streamingllm import StreamingScores
from kvcake.methods.tova import TOVAScores
from reference import brute_force_allocation, cake_reference, reference_logits, row_entries

LAYERS, KV_HEADS, GROUPS, HEAD_DIM = 4, 2, 2, 16
OBSERVATION = 8  # observation window of the window-attention methods in these tiny tests

#: Every registered method: a method added as a new file is in the matrix with no edit here.
METHODS = [name for name in registry.method_names() if name != "full"]


def windowed(name):
    """Methods whose default window is the 32-token observation window (shrunk for these tiny prompts)."""
    method = registry.entry(name).method
    return method.default_window == 32 and method.window_for(30) == 32


def make(name, budget=30, **kw):
    if windowed(name):
        kw.setdefault("window", OBSERVATION)
    return build(name, budget=budget, **kw)


def components(name):
    return registry.entry(name).components()


def prefill(model, ids, method, attention_mask=None):
    with kvcake.compress(model, method) as press:
        out = model(ids, attention_mask=attention_mask)
        return out, press.cache, press.report


# -- budgets and exactness -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_budget_accounting(name):
    model = tiny_llama("sdpa")
    ids = prompt(140)
    _, cache, report = prefill(model, ids, make(name, budget=30))
    kept = report.kept_after_prefill[0]
    assert sum(kept) == 30 * LAYERS
    assert kept == report.budgets[0]
    window = make(name).window
    assert all(window <= k <= 140 for k in kept)
    if components(name)[1] is kvcake.Uniform:
        assert kept == [30] * LAYERS
    if components(name)[1] is Pyramid:
        assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    per_entry = KV_HEADS * 2 * HEAD_DIM * 4
    assert report.kv_bytes == sum(report.layer_lengths) * per_entry
    if registry.entry(name).head_wise:
        counts = [(cache.layers[i].position_table()[0] >= 0).sum(-1) for i in range(LAYERS)]
        assert any(len(set(c.tolist())) > 1 for c in counts), "heads should keep different numbers of tokens"
        assert all(int(c.sum()) == k * KV_HEADS for c, k in zip(counts, kept, strict=False))
        assert all(length == int(c.max()) for length, c in zip(report.layer_lengths, counts, strict=False))
    else:
        assert report.layer_lengths == kept


@pytest.mark.parametrize("name", METHODS)
def test_prefill_is_exact_and_a_covering_budget_changes_nothing(name, backend):
    model = tiny_llama(backend)
    ids = prompt(70)
    full_logits = model(ids).logits
    out, _, _ = prefill(model, ids, make(name, budget=24))
    assert torch.equal(out.logits, full_logits)
    full = model.generate(ids, max_new_tokens=10, do_sample=False)
    method = make(name, budget=90)
    with kvcake.compress(model, method) as press:
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert press.report.kept_after_prefill == [[70] * LAYERS]
    if method.decode_eviction and method.decode_budget == "prefill":
        # The authors' decoding holds every layer at its prefill budget (here the whole prompt), so it evicts while
        # generating: only the prefill is covered.
        assert press.report.kept_now == [[70] * LAYERS]
        return
    assert torch.equal(out, full)


@pytest.mark.parametrize("name", METHODS)
def test_cascade_equals_one_shot(name):
    model = tiny_llama("sdpa")
    ids = prompt(160)
    _, cascade, rc = prefill(model, ids, make(name, budget=28))
    _, oneshot, ro = prefill(model, ids, make(name, budget=28, cascade=False))
    assert rc.budgets == ro.budgets
    for i in range(LAYERS):
        assert torch.equal(cascade.layers[i].position_table(), oneshot.layers[i].position_table())
    assert ro.peak_kv_bytes == ro.kv_bytes_full
    assert rc.peak_kv_bytes < ro.peak_kv_bytes
    if registry.entry(name).head_wise:
        # Heads keep different counts; the layer is stored padded to its longest head, and that is reported.
        assert rc.padding_bytes > 0
        assert rc.kv_bytes == rc.padding_bytes + sum(rc.kept_after_prefill[0]) * KV_HEADS * 2 * HEAD_DIM * 4
    else:
        assert rc.peak_kv_bytes <= rc.peak_bound_bytes
        assert rc.padding_bytes == 0


# -- kept = top-scored, against independent references ---------------------------------------------------------------

def _pool(x, kernel, pooling):
    n = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(n):
        lo, hi = max(0, i - kernel // 2), min(n, i + kernel // 2 + 1)
        out[..., i] = x[..., lo:hi].amax(-1) if pooling == "max" else x[..., lo:hi].sum(-1) / kernel
    return out


def _gqa(x):
    return x.reshape(x.shape[0], KV_HEADS, GROUPS, -1).mean(2)


def _views(model, ids, method):
    """What each layer's prefill attention saw, as the LayerViews the scorer and allocator are given."""
    from kvcake.engines.transformers.replay import record_prefill
    from kvcake.methods.views import LayerView

    record, _ = record_prefill(model, ids, method)
    return [LayerView(query=r.query, keys=r.key, scaling=r.scaling, key_valid=r.key_valid, softcap=r.softcap,
                      layer=i, num_layers=LAYERS, values=r.value, positions=r.positions, rotary=r.rotary)
            for i, r in sorted(record.layers.items())]


def reference_scores(name, attn, seq, view):
    """Per KV head, reference scores of the evictable keys, and the positions always kept.

    Independent loop-based references for the scorers we know; for any other scorer (a method added later) the
    scorer's own prefill scores, so that the engine's choice of kept entries is still checked against them."""
    method = make(name)
    w = method.window
    scorer = method.scorer
    if type(scorer) is SnapKVScores:
        rows = attn[0, :, seq - w:, : seq - w].double().mean(1)
        return _gqa(_pool(rows, scorer.kernel, scorer.pooling)[None])[0], list(range(seq - w, seq))
    if type(scorer) is H2OScores:
        return _gqa(attn[0].double().sum(1)[None])[0][:, : seq - w], list(range(seq - w, seq))
    if type(scorer) is TOVAScores:
        last = attn[0, :, -1].double().mean(0)
        return last[None].expand(KV_HEADS, -1)[:, : seq - 1], [seq - 1]
    if type(scorer) is CakeScores:
        _, ind = cake_reference(attn[:, :, -w:, :], KV_HEADS, gamma=200.0, kernel=5, pooling=scorer.pooling)
        return ind[0], list(range(seq - w, seq))
    return scorer.prefill(view, w)[0, :, : seq - w].double(), list(range(seq - w, seq))


def reference_budgets(name, attentions, total, cap, views):
    allocator = make(name).allocator
    if type(allocator) is Preference:
        prefs = [cake_reference(a[:, :, -OBSERVATION:, :], KV_HEADS, 200.0, 5)[0][0] for a in attentions]
        return brute_force_allocation(prefs, total, cap)
    if type(allocator) is Pyramid:
        low, high = 1 / 20, 2 - 1 / 20
        weights = [high - i * (high - low) / (LAYERS - 1) for i in range(LAYERS)]
        return brute_force_allocation(weights, total, cap)
    weights = allocator.weights(LAYERS)
    if weights is None:  # an allocator added later: its own preferences, split by the definition
        weights = [float(allocator.preference(v, make(name).window)[0]) for v in views]
    return brute_force_allocation(weights, total, cap)


@pytest.mark.parametrize("name", [m for m in METHODS if components(m)[0] is not StreamingScores])
def test_kept_positions_are_the_top_scored(name):
    model = tiny_llama("eager")
    seq, budget = 150, 30
    ids = prompt(seq)
    attentions = model(ids, output_attentions=True).attentions
    _, cache, report = prefill(model, ids, make(name, budget=budget))
    window = make(name).window
    views = _views(model, ids, make(name, budget=budget))
    budgets = reference_budgets(name, attentions, (budget - window) * LAYERS, seq - window, views)
    assert [b + window for b in budgets] == report.budgets[0]
    for layer_idx, share in enumerate(budgets):
        scores, protected = reference_scores(name, attentions[layer_idx], seq, views[layer_idx])
        positions = cache.layers[layer_idx].position_table()[0]
        chosen_all, evicted_all = [], []
        for head in range(KV_HEADS):
            kept = [p for p in positions[head].tolist() if p >= 0]
            assert kept == sorted(kept) and set(protected) <= set(kept)
            chosen = [p for p in kept if p not in protected]
            evicted = sorted(set(range(seq)) - set(kept))
            chosen_all.append(chosen)
            evicted_all.append(evicted)
            s = scores[head]
            tol = 1e-5 * float(s.abs().max())
            if chosen and evicted:
                assert float(s[chosen].min()) >= float(s[evicted].max()) - tol, (layer_idx, head)
        if registry.entry(name).head_wise:
            floor = int(0.2 * share)
            assert sum(len(c) for c in chosen_all) == share * KV_HEADS
            assert all(len(c) >= floor for c in chosen_all)
            # Beyond each head's floor the layer's budget went to the best scores of any head.
            extra = [sorted(scores[h][c].tolist(), reverse=True)[floor:] for h, c in enumerate(chosen_all)]
            beyond = [x for e in extra for x in e]
            worst_evicted = max(float(scores[h][e].max()) for h, e in enumerate(evicted_all) if e)
            if beyond:
                assert min(beyond) >= worst_evicted - 1e-5 * float(scores.abs().max())
        else:
            assert all(len(c) == share for c in chosen_all)


def test_streamingllm_keeps_sinks_and_the_most_recent_tokens():
    model = tiny_llama("sdpa")
    ids = prompt(120)
    _, cache, _ = prefill(model, ids, kvcake.StreamingLLM(budget=30, sinks=4, decode_eviction=False))
    expected = list(range(4)) + list(range(120 - 26, 120))
    for layer in cache.layers:
        for head in layer.position_table()[0].tolist():
            assert head == expected
    with kvcake.compress(model, kvcake.StreamingLLM(budget=30, sinks=4)) as press:
        model.generate(ids, max_new_tokens=15, min_new_tokens=15, do_sample=False)
        for layer in press.cache.layers:
            # 14 tokens fed back: the 4 sinks and the newest 26
            assert layer.position_table()[0, 0].tolist() == list(range(4)) + list(range(134 - 26, 134))


# -- decoding against plain attention over the kept entries, every method ------------------------------------------

def check_decoding_against_reference(model, method) -> None:
    """A padded batch of 2 prefilled under ``method``, then 4 decoding steps: each row's logits equal plain attention
    over exactly the entries that row kept (tests/reference.py), at its true positions."""
    ids = prompt(100, batch=2, seed=9)
    pads = [0, 31]
    mask = torch.ones_like(ids)
    mask[1, : pads[1]] = 0
    with kvcake.compress(model, method) as press:
        cache = press.new_cache()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        references = [row_entries(cache, row, pads[row]) for row in range(2)]
        for _step in range(4):
            token = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            with torch.no_grad():
                logits = model(token, attention_mask=mask, cache=cache, position_ids=positions).logits[:, -1]
            for row in range(2):
                expected, references[row] = reference_logits(model, token[row:row + 1], int(positions[row]),
                                                             references[row])
                torch.testing.assert_close(logits[row:row + 1], expected, atol=2e-5, rtol=1e-4)
        assert press.report.prompt_tokens == [100, 69]


@pytest.mark.parametrize("name", METHODS)
def test_decoding_equals_reference_batch_and_padding(name, backend):
    check_decoding_against_reference(tiny_llama(backend), make(name, budget=26, decode_eviction=False))


# -- decode-time eviction --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["h2o", "tova", "streamingllm", "cake"])
def test_decode_eviction_holds_the_budget_over_200_tokens(name):
    model = tiny_llama("sdpa", layers=2)
    ids = prompt(64)
    with kvcake.compress(model, make(name, budget=20)) as press:
        out = model.generate(ids, max_new_tokens=200, min_new_tokens=200, do_sample=False)
        report = press.report
        lengths = [layer.length for layer in press.cache.layers]
    assert out.shape[1] == 264
    assert report.kept_now == report.budgets
    if name != "cake":  # uniform methods; CAKE splits the 40 tokens by preference
        assert report.budgets == [[20, 20]]
    assert lengths == report.budgets[0]
    per_entry = KV_HEADS * 2 * HEAD_DIM * 4
    assert report.spare_bytes == len(lengths) * per_entry  # one slot per layer for the next token
    assert report.kv_bytes == sum(report.budgets[0]) * per_entry + report.spare_bytes


def _removed(before, after):
    return sorted(set(before) - set(after))


def test_h2o_accumulates_attention_while_decoding_and_drops_the_lowest():
    model = tiny_llama("eager")
    seq, budget = 90, 24
    ids = prompt(seq)
    method = kvcake.H2O(budget=budget)  # recent window = 12
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    totals = [{p: _gqa(a[0].double().sum(1)[None])[0][:, p] for p in range(seq)} for a in attentions]
    with kvcake.compress(model, method) as press, torch.no_grad():
        cache = press.new_cache()
        out = model(ids, cache=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(20):
            before = [cache.layers[i].position_table()[0].tolist() for i in range(LAYERS)]
            out = model(token, cache=cache, position_ids=torch.tensor([[seq + step]]), output_attentions=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for i in range(LAYERS):
                probs = _gqa(out.attentions[i][0, :, -1].double()[None])[0]  # (Hkv, L+1) over entries before eviction
                entries = [before[i][h] + [seq + step] for h in range(KV_HEADS)]
                after = cache.layers[i].position_table()[0].tolist()
                for h in range(KV_HEADS):
                    for j, p in enumerate(entries[h]):
                        totals[i].setdefault(p, torch.zeros(KV_HEADS, dtype=torch.float64))
                        totals[i][p] = totals[i][p].clone()
                        totals[i][p][h] += probs[h, j]
                    removed = _removed(entries[h], after[h])
                    assert len(removed) == 1 and len(after[h]) == budget
                    candidates = entries[h][: len(entries[h]) - method.window]
                    lowest = min(float(totals[i][p][h]) for p in candidates)
                    assert float(totals[i][removed[0]][h]) <= lowest + 1e-6


def test_tova_drops_the_entry_the_new_token_attends_least():
    model = tiny_llama("eager")
    seq = 80
    ids = prompt(seq)
    with kvcake.compress(model, kvcake.TOVA(budget=20)) as press, torch.no_grad():
        cache = press.new_cache()
        out = model(ids, cache=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(10):
            before = [cache.layers[i].position_table()[0, 0].tolist() for i in range(LAYERS)]
            out = model(token, cache=cache, position_ids=torch.tensor([[seq + step]]), output_attentions=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for i in range(LAYERS):
                positions = cache.layers[i].position_table()[0]
                assert torch.equal(positions[0], positions[1]), "TOVA keeps the same tokens in every head"
                score = out.attentions[i][0, :, -1].double().mean(0)[:-1]  # the newest token is protected
                removed = _removed(before[i] + [seq + step], positions[0].tolist())
                assert len(removed) == 1
                assert float(score[before[i].index(removed[0])]) <= float(score.min()) + 1e-9


# -- composition and bad parameters --------------------------------------------------------------------------------

def test_composition_is_one_argument():
    assert kvcake.CAKE(budget=64, scorer=kvcake.SnapKVScores()).label == "cake[scorer=snapkv]"
    assert kvcake.CAKE(budget=64, scorer=kvcake.H2OScores()).label == "cake[scorer=h2o]"
    assert kvcake.CAKE(budget=64, allocator=kvcake.Uniform()).label == "cake[allocator=uniform]"
    assert kvcake.AdaKV(kvcake.CAKE(budget=64, decode_eviction=False)).label == "ada-cake"
    assert kvcake.AdaKV(kvcake.SnapKV(budget=64)).head_alpha == 0.2


@pytest.mark.parametrize("factory, message", [
    (lambda: kvcake.StreamingLLM(budget=64, sinks=-1), "sinks"),
    (lambda: kvcake.StreamingLLM(budget=4, sinks=4), "sinks"),
    (lambda: kvcake.SnapKV(budget=16, window=32), "window"),
    (lambda: kvcake.H2O(budget=16, window=20), "window"),
    (lambda: kvcake.SnapKV(budget=64, pooling="median"), "pooling"),
    (lambda: kvcake.SnapKV(budget=64, kernel=6), "odd"),
    (lambda: kvcake.PyramidKV(budget=64, beta=0.5), "beta"),
    (lambda: kvcake.AdaKV(kvcake.SnapKV(budget=64), alpha=1.5), "head_alpha"),
    (lambda: kvcake.SnapKV(budget=64, head_alpha=0.2, decode_eviction=True), "prefill only"),
    (lambda: build("nope", budget=64), "unknown method"),
    (lambda: build("snapkv", budget=64, gamma=3.0), "no parameter"),
    (lambda: kvcake.Method(budget=64), "scorer"),
])
def test_bad_parameters_give_clear_errors(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()
