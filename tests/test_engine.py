"""The CAKE engine on a tiny random Llama: exactness, kept = top-scored, decode equivalence, memory, bad input."""

import contextlib

import pytest
import torch

import kvcake
from conftest import prompt, tiny_llama
from reference import brute_force_allocation, cake_reference, reference_logits, row_entries

WINDOW = 8


def cake(**kw):
    kw.setdefault("window", WINDOW)
    return kvcake.CAKE(**kw)


def prefill(model, ids, method, attention_mask=None):
    """Run one compressed prefill; return (logits, cache, report)."""
    with kvcake.compress(model, method) as press:
        out = model(ids, attention_mask=attention_mask)
        cache = press.cache
        report = press.report
    return out.logits, cache, report


def kept_positions(cache, layer_idx):
    layer = cache.layers[layer_idx]
    return layer.position_table().clone()


# -- prefill exactness -----------------------------------------------------------------------------------------------

def test_prefill_output_and_first_token_equal_full_cache(backend):
    model = tiny_llama(backend)
    ids = prompt(120)
    full = model(ids).logits
    logits, _, report = prefill(model, ids, cake(budget=24))
    assert torch.equal(logits, full)
    assert sum(report.kept_after_prefill[0]) == 24 * 4
    with kvcake.compress(model, cake(budget=24)):
        first = model.generate(ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(first, model.generate(ids, max_new_tokens=1, do_sample=False))


@pytest.mark.parametrize("decode_eviction", [True, False])
def test_budget_covering_the_prompt_generates_identically(backend, decode_eviction):
    model = tiny_llama(backend)
    ids = prompt(60)
    full = model.generate(ids, max_new_tokens=12, do_sample=False)
    with kvcake.compress(model, cake(budget=72, decode_eviction=decode_eviction)) as press:
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, full)
    assert press.report.kept_after_prefill == [[60] * 4]
    with kvcake.compress(model, cake(ratio=1.0, decode_eviction=False)):
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), full)


def test_window_longer_than_prompt_changes_nothing(backend):
    model = tiny_llama(backend)
    ids = prompt(20)
    full = model.generate(ids, max_new_tokens=8, do_sample=False)
    with kvcake.compress(model, kvcake.CAKE(budget=32, window=32, decode_eviction=False)) as press:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, full)
    assert press.report.kept_after_prefill == [[20] * 4]


# -- what is kept --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [(1.0, 1.0), (1.6, 0.6)])
def test_kept_positions_are_the_top_scored(tau):
    model = tiny_llama("eager")
    ids = prompt(150)
    method = cake(budget=30, tau1=tau[0], tau2=tau[1])
    out = model(ids, output_attentions=True)
    _, cache, report = prefill(model, ids, method)

    prefs, indicators = [], []
    for attn in out.attentions:
        p, ind = cake_reference(attn[:, :, -WINDOW:, :], kv_heads=2, gamma=method.gamma, kernel=method.kernel,
                                tau1=method.tau1, tau2=method.tau2)
        prefs.append(p[0])
        indicators.append(ind[0])
    seq = ids.shape[1]
    budgets = brute_force_allocation(prefs, (30 - WINDOW) * 4, seq - WINDOW)
    assert [b + WINDOW for b in budgets] == report.budgets[0] == report.kept_after_prefill[0]
    assert sum(report.kept_after_prefill[0]) == 30 * 4

    for layer_idx, (budget, ind) in enumerate(zip(budgets, indicators, strict=False)):
        positions = kept_positions(cache, layer_idx)[0]  # (Hkv, kept)
        for head in range(2):
            kept = positions[head].tolist()
            assert kept == sorted(kept)
            assert kept[-WINDOW:] == list(range(seq - WINDOW, seq)), "the window is always kept"
            chosen = torch.tensor(kept[:-WINDOW])
            assert len(chosen) == budget
            evicted = torch.tensor(sorted(set(range(seq - WINDOW)) - set(kept)))
            if len(chosen) and len(evicted):
                scale = ind[head].abs().max()
                assert ind[head][chosen].min() >= ind[head][evicted].max() - 1e-5 * scale


def test_cascade_and_one_shot_give_identical_caches(backend):
    model = tiny_llama(backend, layers=6)
    ids = prompt(200)
    _, cascade, rc = prefill(model, ids, cake(budget=40, cascade=True))
    _, oneshot, ro = prefill(model, ids, cake(budget=40, cascade=False))
    assert rc.budgets == ro.budgets
    for i in range(6):
        assert torch.equal(kept_positions(cascade, i), kept_positions(oneshot, i))
        assert torch.equal(cascade.layers[i].keys, oneshot.layers[i].keys)
        assert torch.equal(cascade.layers[i].values, oneshot.layers[i].values)
    # Memory: the cascade stays within the SPEC bound; one-shot holds the whole cache at its peak.
    assert rc.peak_kv_bytes <= rc.peak_bound_bytes
    assert ro.peak_kv_bytes == ro.kv_bytes_full
    assert rc.peak_kv_bytes < ro.peak_kv_bytes
    per_token = 2 * 2 * 16 * 4  # kv heads * (k + v) * head_dim * float32
    assert rc.kv_bytes == sum(rc.kept_after_prefill[0]) * per_token
    assert rc.kv_bytes_full == 200 * 6 * per_token


def test_ratio_budget():
    model = tiny_llama("sdpa")
    ids = prompt(100)
    _, _, report = prefill(model, ids, cake(ratio=0.25))
    assert sum(report.kept_after_prefill[0]) == 25 * 4
    assert report.total_budget == [(25 - WINDOW) * 4]


# -- decoding against plain attention over the kept entries ----------------------------------------------------------

def test_decoding_equals_plain_attention_over_kept_entries(backend):
    model = tiny_llama(backend)
    ids = prompt(130)
    method = cake(budget=28, decode_eviction=False)
    with kvcake.compress(model, method) as press:
        cache = press.new_cache()
        logits = model(ids, cache=cache).logits[:, -1]
        reference = row_entries(cache, 0, 0)
        for step in range(6):
            token = logits.argmax(-1, keepdim=True)
            position = ids.shape[1] + step
            logits = model(token, cache=cache, position_ids=torch.tensor([[position]])).logits[:, -1]
            expected, reference = reference_logits(model, token, position, reference)
            torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    assert all(length == b + 6 for length, b in zip(press.report.layer_lengths, press.report.budgets[0], strict=False))


def test_padded_batch_decoding_equals_each_row_alone(backend):
    model = tiny_llama(backend)
    ids = prompt(110, batch=2, seed=3)
    pads = [0, 37]
    mask = torch.ones_like(ids)
    mask[1, : pads[1]] = 0
    method = cake(budget=26, decode_eviction=False)
    with kvcake.compress(model, method) as press:
        cache = press.new_cache()
        logits = model(ids, attention_mask=mask, cache=cache).logits[:, -1]
        report = press.report
        references = [row_entries(cache, row, pads[row]) for row in range(2)]
        for _step in range(5):
            token = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            positions = (mask.sum(-1, keepdim=True) - 1)
            logits = model(token, attention_mask=mask, cache=cache, position_ids=positions).logits[:, -1]
            for row in range(2):
                expected, references[row] = reference_logits(
                    model, token[row:row + 1], int(positions[row]), references[row])
                torch.testing.assert_close(logits[row:row + 1], expected, atol=2e-5, rtol=1e-4)
    # Each row kept exactly its own budget; padding never counts as content.
    assert report.prompt_tokens == [110, 73]
    assert [sum(r) for r in report.kept_after_prefill] == [26 * 4, 26 * 4]


def test_padded_batch_generation_matches_rows_alone(backend):
    model = tiny_llama(backend)
    ids = prompt(90, batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :25] = 0
    with kvcake.compress(model, cake(budget=24)) as press:
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        alone0 = model.generate(ids[:1, 25:], max_new_tokens=10, do_sample=False)
        alone1 = model.generate(ids[1:], max_new_tokens=10, do_sample=False)
    assert torch.equal(batch[0, 90:], alone0[0, 65:])
    assert torch.equal(batch[1, 90:], alone1[0, 90:])
    report = press.report  # the last request (row 1 alone) is held at its budget while generating
    assert report.kept_now == report.budgets and sum(report.budgets[0]) == 24 * 4


# -- decode-time eviction ----------------------------------------------------------------------------------------------

def test_decode_eviction_holds_budget_and_drops_the_lowest_scored():
    model = tiny_llama("eager")
    ids = prompt(100)
    method = cake(budget=20)
    with kvcake.compress(model, method) as press:
        cache = press.new_cache()
        out = model(ids, cache=cache)
        budgets = press.report.budgets[0]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(12):
            before = [kept_positions(cache, i) for i in range(4)]
            out = model(token, cache=cache, position_ids=torch.tensor([[100 + step]]), output_attentions=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for i in range(4):
                after = kept_positions(cache, i)
                assert after.shape[-1] == budgets[i]
                probs = out.attentions[i][0, :, -1].double()  # (Hq, L+1) over the entries before eviction
                n = probs.shape[-1]
                pooled = torch.stack([probs[:, max(0, j - 2): j + 3].sum(-1) / 5 for j in range(n)], dim=-1)
                score = pooled.view(2, 2, n).mean(1)
                for head in range(2):
                    old = before[i][0, head].tolist() + [100 + step]
                    removed = sorted(set(old) - set(after[0, head].tolist()))
                    assert len(removed) == 1
                    candidates = score[head, : n - WINDOW]
                    assert candidates[old.index(removed[0])] <= candidates.min() + 1e-9
    assert press.report.kept_now == [budgets]


def _decode_steps(model, cache, token, start, count):
    for step in range(count):
        out = model(token, cache=cache, position_ids=torch.tensor([[start + step]]))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return token


@contextlib.contextmanager
def _decoding(steps, prompt_tokens=80, budget=20):
    """A tiny model compressed by CAKE, prefilled and decoded ``steps`` tokens: yields (model, cache, next token)."""
    model = tiny_llama("sdpa")
    with kvcake.compress(model, cake(budget=budget)) as press, torch.no_grad():
        cache = press.new_cache()
        token = model(prompt(prompt_tokens), cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        yield model, cache, _decode_steps(model, cache, token, prompt_tokens, steps)


def _slot_tensors(layer):
    slots = layer.slots
    return [t for t in (slots.keys, slots.values, slots.positions, slots.count, slots.cursor, slots.targets)
            if t is not None]


def test_decoding_state_keeps_fixed_shapes_and_addresses_over_64_steps():
    # After prefill every layer decodes in buffers of its final size: no tensor is reallocated or reshaped, the new
    # token goes to the slot the last eviction freed, and the entries read in position order stay consistent.
    with _decoding(1) as (model, cache, token):
        before = [[(t.data_ptr(), tuple(t.shape)) for t in _slot_tensors(layer)] for layer in cache.layers]
        _decode_steps(model, cache, token, 81, 64)
        after = [[(t.data_ptr(), tuple(t.shape)) for t in _slot_tensors(layer)] for layer in cache.layers]
        assert after == before
        budgets = cache.report().budgets[0]
        for layer, budget in zip(cache.layers, budgets, strict=False):
            slots = layer.slots
            assert slots.capacity == budget + 1  # the budget plus the slot the next token is written into
            assert int(slots.count.min()) == int(slots.count.max()) == budget
            keys, values, positions = layer.entries()
            assert positions.shape[-1] == budget and bool((positions >= 0).all())
            assert torch.equal(positions, positions.sort(dim=-1).values)
            assert int(positions.max()) == 80 + 64  # the newest token is held
            slot_of = [slots.positions[0, 0].tolist().index(p) for p in positions[0, 0].tolist()]
            assert torch.equal(keys[0, 0], slots.keys[0, 0, slot_of])


def test_thawing_the_decoding_state_keeps_the_entries():
    # Feeding several tokens at once puts a layer back in the prefill layout: the same entries, in position order.
    import copy

    with _decoding(6) as (_, cache, _):
        layer = cache.layers[1]
        frozen = copy.deepcopy(layer)
        layer.thaw()
        assert layer.slots is None
        for got, expected in zip(layer.entries(), frozen.entries(), strict=False):
            assert torch.equal(got, expected)
        assert layer.valid_counts == frozen.kept_per_row(1) and layer.appended == frozen.logical_length()


@pytest.mark.parametrize("mode", ["inference_mode prefill", "grad enabled"])
def test_slot_order_falls_back_to_copies_where_in_place_writes_are_not_allowed(mode):
    # An inference tensor cannot be written outside inference mode, and a write would break autograd history:
    # both fall back to concatenation and must give the same tokens as the in-place path.
    model = tiny_llama("sdpa")
    ids = prompt(70)

    def run(prefill_ctx, decode_ctx):
        with kvcake.compress(model, cake(budget=20)) as press:
            cache = press.new_cache()
            tokens = []
            with prefill_ctx():  # the prefill and 3 steps: the layers are in slot order, with a free slot
                token = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
                for step in range(3):
                    position = torch.tensor([[70 + step]])
                    token = model(token, cache=cache, position_ids=position).logits[:, -1:].argmax(-1)
                    tokens.append(int(token))
            assert all(layer.slots is not None for layer in cache.layers)
            with decode_ctx():
                for step in range(3, 8):
                    position = torch.tensor([[70 + step]])
                    token = model(token, cache=cache, position_ids=position).logits[:, -1:].argmax(-1)
                    tokens.append(int(token))
            return tokens, press.report.kept_now

    reference = run(torch.no_grad, torch.no_grad)
    if mode == "inference_mode prefill":
        assert run(torch.inference_mode, torch.no_grad) == reference
    else:
        assert run(torch.no_grad, torch.enable_grad) == reference


def test_beam_search_reorders_a_cache_in_slot_order():
    model = tiny_llama("sdpa")
    ids = prompt(60)
    with kvcake.compress(model, cake(budget=20)) as press:
        out = model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False)
        report = press.report
    assert out.shape == (1, 72)
    assert report.kept_now[0] == report.budgets[0]


def test_decode_eviction_keeps_memory_constant_over_a_long_generation():
    model = tiny_llama("sdpa", layers=2)
    ids = prompt(64)
    with kvcake.compress(model, cake(budget=16)) as press:
        model.generate(ids, max_new_tokens=200, min_new_tokens=200, do_sample=False)
        report = press.report
    assert report.kept_now == [report.budgets[0]]
    # Each layer holds its share plus one spare slot, which the next token is written into in place.
    per_entry = 2 * 2 * 16 * 4
    assert report.spare_bytes == len(report.budgets[0]) * per_entry
    assert report.kv_bytes == sum(report.budgets[0]) * per_entry + report.spare_bytes


# -- lifecycle and bad input ----------------------------------------------------------------------------------------

def test_requests_do_not_leak_into_each_other():
    model = tiny_llama("sdpa")
    a, b = prompt(80, seed=7), prompt(95, seed=8)
    with kvcake.compress(model, cake(budget=20)) as press:
        first_b = model.generate(b, max_new_tokens=6, do_sample=False)
    with kvcake.compress(model, cake(budget=20)) as press:
        model.generate(a, max_new_tokens=6, do_sample=False)
        again_b = model.generate(b, max_new_tokens=6, do_sample=False)
        assert press.report.prompt_tokens == [95]
    assert torch.equal(first_b, again_b)
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks


def test_empty_prompt_is_an_error():
    model = tiny_llama("sdpa")
    with kvcake.compress(model, cake(budget=20)), pytest.raises(ValueError, match="empty prompt"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_non_finite_attention_is_an_error_not_an_empty_cache():
    model = tiny_llama("sdpa")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("inf")
    with kvcake.compress(model, cake(budget=20)), pytest.raises(kvcake.NonFiniteAttentionError):
        model(prompt(50))


@pytest.mark.parametrize("bad_layer", [0, 2, -1])
def test_non_finite_attention_while_decoding_is_an_error(bad_layer):
    # The check runs once per step, on the last layer's output: NaN from any layer must reach it.
    model = tiny_llama("sdpa")
    ids = prompt(60)
    with kvcake.compress(model, cake(budget=20)) as press:
        cache = press.new_cache()
        with torch.no_grad():
            model(ids, cache=cache)
            model.model.layers[bad_layer].self_attn.q_proj.weight[0, 0] = float("nan")
            with pytest.raises(kvcake.NonFiniteAttentionError):
                model(torch.tensor([[5]]), cache=cache, position_ids=torch.tensor([[60]]))


def test_unsupported_architecture_names_the_model_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(kvcake.UnsupportedModelError, match="GPT2LMHeadModel"), kvcake.compress(model, cake(budget=20)):
        pass


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "positive"), ({"budget": -5}, "positive"), ({"ratio": 0.0}, r"\(0, 1\]"),
    ({"ratio": 1.5}, r"\(0, 1\]"), ({"ratio": float("nan")}, r"\(0, 1\]"), ({}, "exactly one"),
    ({"budget": 10, "ratio": 0.5}, "exactly one"), ({"budget": 4}, "window"), ({"budget": 64, "kernel": 4}, "odd"),
    ({"budget": 64, "tau1": 0}, "tau1"), ({"budget": 64, "gamma": -1}, "gamma"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kvcake.CAKE(**{"window": WINDOW, **kwargs})


def test_presets():
    m = kvcake.CAKE.from_preset("meta-llama/Llama-3.1-8B-Instruct", budget=1024)
    assert (m.tau1, m.tau2) == (1.6, 0.4)
    assert kvcake.CAKE.from_preset("Qwen2.5-7B-Instruct", budget=100).tau1 == 0.4
    with pytest.raises(KeyError, match="no published tau"):
        kvcake.tau_preset("gpt-9", 128)


def test_accelerate_device_map_keeps_layers_on_their_device():
    from accelerate import dispatch_model

    model = dispatch_model(tiny_llama("sdpa"), device_map={"": "cpu"})
    ids = prompt(70)
    full = model.generate(ids, max_new_tokens=5, do_sample=False)
    with kvcake.compress(model, cake(budget=80)) as press:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        for layer in press.cache.layers:
            assert layer.keys.device == layer.values.device == torch.device("cpu")
    assert torch.equal(out, full)


def test_a_reset_cache_serves_a_new_request_like_a_fresh_one():
    model = tiny_llama("sdpa")
    a, b = prompt(90, seed=11), prompt(70, seed=12)
    with kvcake.compress(model, cake(budget=20)) as press:
        fresh = press.new_cache()
        expected = model(b, cache=fresh).logits
        cache = press.new_cache()
        model(a, cache=cache)
        cache.reset()
        assert torch.equal(model(b, cache=cache).logits, expected)
        assert cache.prompt_tokens == [70]
        for i in range(4):
            assert torch.equal(kept_positions(cache, i), kept_positions(fresh, i))


def test_beam_search_runs_on_the_compressed_cache_and_matches_full_when_covering():
    model = tiny_llama("sdpa")
    ids = prompt(60)
    full = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    with kvcake.compress(model, cake(budget=80)):
        assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False), full)
    with kvcake.compress(model, cake(budget=24)) as press:
        out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        report = press.report
    assert out.shape == (1, 66)
    assert report.kept_now == report.budgets  # each beam held at its budget while decoding


# -- the authors' decoding ---------------------------------------------------------------------------------------------

def test_authors_decoding_keeps_every_layer_at_its_prefill_budget():
    # kvcake's default re-split lets a layer capped by a short prompt grow while decoding; the authors' code keeps
    # every layer at its prefill budget.
    model = tiny_llama("sdpa")
    ids = prompt(40)
    budgets = {}
    for rule in ("resplit", "prefill"):
        with kvcake.compress(model, cake(budget=60, decode_budget=rule)) as press:
            model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            budgets[rule] = press.report
    assert budgets["prefill"].kept_now == budgets["prefill"].kept_after_prefill == [[40] * 4]
    # Prompt and answer (the last token is never fed back: 40 + 11) fit in the budget: nothing is evicted.
    assert budgets["resplit"].kept_now == [[51] * 4]


def test_authors_decode_pooling_leaves_the_window_out_of_the_pooling():
    from kvcake.methods.views import DecodeView

    probs = torch.rand(1, 4, 12, generator=torch.Generator().manual_seed(0))
    view = DecodeView(query=torch.zeros(1, 4, 1, 16), scaling=1.0, softcap=None,
                      positions=torch.arange(12).expand(1, 2, 12), allowed=None, stored=None, probs=probs, window=4)
    grouped = probs.view(1, 2, 2, 12).mean(2)
    kvcake_scores = kvcake.CakeScores(kernel=3).decode(view)
    authors = kvcake.CakeScores(kernel=3, decode_pooling="outside-window").decode(view)
    padded = torch.nn.functional.pad(grouped[..., :8], (1, 1))
    expected = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / 3
    torch.testing.assert_close(authors[..., :8], expected)
    assert not torch.allclose(kvcake_scores[..., 7], authors[..., 7])  # the last non-window entry differs
    torch.testing.assert_close(kvcake_scores[..., :7], authors[..., :7])


# -- the tail protocol: the chat template's tail left uncompressed ---------------------------------------------------

def test_an_uncompressed_tail_is_kept_and_unseen_by_the_scorer():
    # With a 6-token tail, the layer is scored as if the prompt ended 6 tokens earlier (the window ends there), and
    # every layer keeps its share and window of the rest plus the whole tail.
    model = tiny_llama("sdpa")
    ids = prompt(120)
    tail = 6
    with kvcake.compress(model, cake(budget=30), uncompressed_tail=tail) as press:
        model(ids)
        report = press.report
        cache = press.cache
    head_only = kvcake.compress(model, cake(budget=30))
    with head_only:
        model(ids[:, :-tail])
        shorter = head_only.cache
    assert report.prompt_tokens == [120] and report.uncompressed_tail == tail
    assert report.budgets == [[b + tail for b in head_only.report.budgets[0]]]
    for layer, alone in zip(cache.layers, shorter.layers, strict=False):
        kept = layer.position_table()[0]
        assert kept[:, -tail:].tolist() == [list(range(114, 120))] * 2  # the tail, always kept
        assert torch.equal(kept[:, :-tail], alone.position_table()[0])  # the rest: as if the prompt stopped there


def test_a_covering_budget_with_a_tail_still_generates_as_the_full_cache():
    model = tiny_llama("sdpa")
    ids = prompt(60)
    full = model.generate(ids, max_new_tokens=8, do_sample=False)
    with kvcake.compress(model, cake(budget=80), uncompressed_tail=5):
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), full)


# -- the cascade without host synchronisation ------------------------------------------------------------------------

def test_cascade_stages_applied_late_give_the_same_cache(monkeypatch):
    # On a GPU a stage's shares reach the host while later layers run, and the newest stage that has landed is
    # applied: simulate stages that land only at the end (the worst case) and compare with stages applied at once.
    from kvcake.engines.transformers import prefill as prefill_module

    model = tiny_llama("sdpa", layers=6)
    ids = prompt(200)
    _, prompt_order, on_time = prefill(model, ids, cake(budget=40))
    monkeypatch.setattr(prefill_module.Stage, "ready", lambda self: False)
    _, late_cache, late = prefill(model, ids, cake(budget=40))
    assert late.budgets == on_time.budgets and late.kept_after_prefill == on_time.kept_after_prefill
    for a, b in zip(late_cache.layers, prompt_order.layers, strict=False):
        assert torch.equal(a.position_table(), b.position_table()) and torch.equal(a.keys, b.keys)
    assert late.peak_kv_bytes > on_time.peak_kv_bytes  # the price of never waiting: evictions come later
