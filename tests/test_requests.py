"""The request contract of a compress block: every forward is compressed as documented or refused, a cache the
caller passes is honoured, and the report always describes the latest request."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.cache import UnsupportedCacheError


def hand_written_loop(model, ids, cache, steps):
    """Greedy decoding the way a user writes it: one forward per token on the caller's own cache."""
    tokens = []
    with torch.no_grad():
        out = model(ids, cache=cache)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            out = model(token, cache=cache)
    return tokens


def test_a_hand_written_loop_on_its_own_dynamic_cache_keeps_its_context():
    # The block used to swap the caller's DynamicCache for a fresh kvcake cache on every forward: the caller's object
    # stayed empty and every later step ran with no context. Now the caller's object is compressed in place.
    model = tiny_llama("sdpa")
    ids = prompt(60)
    expected = hand_written_loop(model, ids, DynamicCache(), 12)
    with kvcake.compress(model, kvcake.CAKE(budget=10**6, window=8)) as press:
        cache = DynamicCache()
        assert hand_written_loop(model, ids, cache, 12) == expected
        assert isinstance(cache, kvcake.KVCakeCache) and press.cache is cache
        assert press.report.kept_after_prefill == [[60] * 4]


def test_a_hand_written_loop_at_a_small_budget_holds_the_budget_in_the_callers_cache():
    model = tiny_llama("sdpa")
    with kvcake.compress(model, kvcake.CAKE(budget=20, window=8)) as press:
        cache = DynamicCache()
        hand_written_loop(model, prompt(80), cache, 10)
        report = press.report
    assert cache.get_seq_length() == 90
    assert report.kept_now == report.budgets and sum(report.budgets[0]) == 20 * 4


def test_a_cache_holding_a_prefix_is_refused_not_run_uncompressed():
    # A prefix cache (prefix caching, a chat's earlier turns) used to run uncompressed without a word, and the report
    # then described the previous request.
    model = tiny_llama("sdpa")
    prefix = DynamicCache()
    with torch.no_grad():
        model(prompt(30, seed=4), cache=prefix)
    with kvcake.compress(model, kvcake.CAKE(budget=20, window=8)) as press:
        model.generate(prompt(50, seed=5), max_new_tokens=2, do_sample=False)
        with pytest.raises(UnsupportedCacheError, match="already holds 30 tokens"):
            model.generate(torch.cat([prompt(30, seed=4), prompt(20, seed=6)], dim=1), cache=prefix,
                           max_new_tokens=2, do_sample=False)
        assert press.report.prompt_tokens == [50]  # still the latest request that ran


@pytest.mark.parametrize("kind", ["static"])
def test_a_cache_of_another_kind_is_refused(kind):
    model = tiny_llama("sdpa")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with kvcake.compress(model, kvcake.CAKE(budget=20, window=8)), pytest.raises(UnsupportedCacheError,
                                                                                 match="StaticCache"):
        model(prompt(40), cache=cache)


def test_a_kvcake_cache_continues_its_request_across_turns():
    # A chat's second turn fed on the first turn's kvcake cache: appended and held to the budget, and the report is
    # that cache's.
    model = tiny_llama("sdpa")
    with kvcake.compress(model, kvcake.CAKE(budget=20, window=8)) as press, torch.no_grad():
        cache = press.new_cache()
        model(prompt(70, seed=2), cache=cache)
        turn = prompt(9, seed=3)
        positions = torch.arange(70, 79)[None]
        model(turn, cache=cache, position_ids=positions)
        report = press.report
    assert cache.get_seq_length() == 79
    assert report.kept_now == report.budgets


def test_the_report_is_the_latest_requests():
    model = tiny_llama("sdpa")
    with kvcake.compress(model, kvcake.CAKE(budget=20, window=8)) as press:
        model.generate(prompt(50), max_new_tokens=2, do_sample=False)
        model.generate(prompt(64, seed=9), max_new_tokens=2, do_sample=False)
        assert press.report.prompt_tokens == [64]
    assert press.report.prompt_tokens == [64]


def test_plain_import_reaches_models_and_methods():
    # The README's library example: `import kvcake` then `kvcake.models.load` (used to raise AttributeError).
    import importlib

    fresh = importlib.reload(kvcake)
    assert callable(fresh.models.load) and fresh.CAKE is kvcake.methods.CAKE


def test_a_model_with_only_sliding_window_layers_is_entered_with_a_warning_and_reports_why():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                              max_position_embeddings=256)
    model = tf.MistralForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="sliding-window"), kvcake.compress(model, kvcake.CAKE(budget=20, window=8)) \
            as press:
        model.generate(prompt(40), max_new_tokens=2, do_sample=False)
        with pytest.raises(RuntimeError, match="nothing was compressed"):
            _ = press.report


@pytest.mark.parametrize("method", [kvcake.CAKE(budget=10**6, window=8), kvcake.SnapKV(budget=10**6, window=8)])
def test_a_long_hand_written_loop_regrows_its_buffers_without_losing_a_token(method):
    # Without max_new_tokens the decoding buffers are sized for 32 tokens and regrown when full. The check of a full
    # buffer used to be skipped (its counter was reset by every layer after the first), so a padded batch's buffers
    # overflowed and overwrote the oldest slot after 32 tokens.
    model = tiny_llama("sdpa")
    ids = prompt(60, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0

    def loop(cache, steps=80):
        tokens, m = [], mask
        with torch.no_grad():
            out = model(ids, attention_mask=m, cache=cache)
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token[:, 0].tolist())
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
                out = model(token, cache=cache, attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1)
        return tokens

    expected = loop(DynamicCache())
    with kvcake.compress(model, method) as press:
        cache = DynamicCache()
        assert loop(cache) == expected
        assert press.report.kept_now == [[140] * 4, [120] * 4]
        assert all(layer.slots.capacity > 140 for layer in cache.layers)


@pytest.mark.parametrize("method", [None, "cake", kvcake.CAKE])
def test_a_block_without_a_method_is_refused_at_entry(method):
    # compress(model, None) used to enter, and the first prefill failed deep inside with an AttributeError.
    model = tiny_llama("sdpa")
    with pytest.raises(TypeError, match="kvcake method"):
        kvcake.compress(model, method)
