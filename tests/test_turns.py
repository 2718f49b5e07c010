"""A compressed cache across a chat's turns: the next turn, fed the way transformers documents it (``generate`` with
the previous output's cache and the whole token sequence), goes on inside the block; a kvcake cache is never read as
a plain cache (after the block, on another model, under another method); cropping (prompt-lookup and assisted
decoding) is exact where it can be and refused where it cannot."""

import pytest
import torch
from transformers import DynamicCache

import kvcake
from conftest import prompt, tiny_llama
from kvcake.engines.transformers.cache import UnsupportedCacheError

#: A covering budget: nothing is evicted, so every token must be the plain model's.
COVER = 10**6
SETTINGS = dict(do_sample=False, return_dict_in_generate=True)


def varied_llama(seed: int = 0, impl: str = "sdpa"):
    """A tiny random Llama whose greedy tokens vary (the default initialisation repeats one token)."""
    return tiny_llama(impl, seed=seed, initializer_range=0.2)


def turns(model, first: torch.Tensor, more: list[torch.Tensor], new: int = 6, mask: bool = False,
          first_mask: torch.Tensor | None = None, caches: list | None = None) -> list[list[list[int]]]:
    """A chat: ``first`` generated on, then each of ``more`` appended to the whole sequence so far and generated on
    with the previous output's cache. The new tokens of every turn, per row."""
    extra = {} if first_mask is None else {"attention_mask": first_mask}
    out = model.generate(first, max_new_tokens=new, **SETTINGS, **extra)
    answers = [out.sequences[:, first.shape[1]:].tolist()]
    seen_mask = first_mask
    for turn in more:
        ids = torch.cat([out.sequences, turn.expand(out.sequences.shape[0], -1)], dim=1)
        if seen_mask is not None:
            seen_mask = torch.cat([seen_mask, seen_mask.new_ones(ids.shape[0], ids.shape[1] - seen_mask.shape[1])], 1)
        extra = {"attention_mask": seen_mask if seen_mask is not None else torch.ones_like(ids)} if mask else {}
        out = model.generate(ids, cache=out.past_key_values, max_new_tokens=new, **SETTINGS, **extra)
        if caches is not None:
            caches.append(out.past_key_values)
        answers.append(out.sequences[:, ids.shape[1]:].tolist())
    return answers


FAMILIES = [
    pytest.param(lambda budget: kvcake.CAKE(budget=budget, window=8), id="cake-decode-eviction"),
    pytest.param(lambda budget: kvcake.CAKE(budget=budget, window=8, decode_eviction=False), id="cake-prefill-only"),
    pytest.param(lambda budget: kvcake.SnapKV(budget=budget, window=8), id="snapkv"),
    pytest.param(lambda budget: kvcake.H2O(budget=budget, window=8), id="h2o"),
]


# -- the next turn inside the block ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("build", FAMILIES)
def test_three_turns_at_a_covering_budget_give_the_plain_models_tokens(build, mask):
    # The second turn used to fail inside the block: a frozen layer sized transformers' mask for one query
    # ("attention mask covers 1 positions but the sequence has N").
    model = varied_llama()
    first, more = prompt(90, seed=1), [prompt(7, seed=2), prompt(5, seed=3)]
    expected = turns(model, first, more, mask=mask)
    with kvcake.compress(model, build(COVER)):
        assert turns(model, first, more, mask=mask) == expected
    assert len({tuple(t[0]) for t in expected}) == 3  # the turns answer differently: the comparison means something


def test_a_padded_batch_goes_on_over_turns_with_the_plain_models_tokens():
    model = varied_llama()
    first = prompt(60, batch=2, seed=4)
    first[0, :11] = model.config.pad_token_id
    mask = (first != model.config.pad_token_id).long()
    more = [prompt(6, seed=5), prompt(4, seed=6)]
    expected = turns(model, first, more, mask=True, first_mask=mask)
    with kvcake.compress(model, kvcake.CAKE(budget=COVER, window=8)):
        assert turns(model, first, more, mask=True, first_mask=mask) == expected


@pytest.mark.parametrize("build", FAMILIES)
def test_three_turns_with_eviction_append_each_turn_and_hold_the_budgets(build):
    # Decode-time eviction brings every layer back to its budget after each turn; prefill-only methods keep the
    # turns whole on top of what the prefill kept. The logical length is always the whole conversation's.
    model = varied_llama()
    method = build(40)
    first, more = prompt(120, seed=1), [prompt(9, seed=2), prompt(6, seed=3)]
    caches: list = []
    with kvcake.compress(model, method) as press:
        answers = turns(model, first, more, caches=caches)
        report = press.report
    cache = caches[-1]
    assert cache is caches[0]  # one cache, continued
    length = 120 + sum(len(a[0]) for a in answers) + 9 + 6 - 1  # every token but the last answer's last one was fed
    assert cache.get_seq_length() == length
    if method.decode_eviction:
        assert report.kept_now == report.budgets
    else:
        grown = length - 120
        assert report.kept_now == [[k + grown for k in row] for row in report.kept_after_prefill]
        assert report.kept_after_prefill != [[120] * 4]  # the prefill did evict


@pytest.mark.parametrize("build", FAMILIES[:3])
def test_the_next_turn_through_generate_is_the_documented_continuation(build):
    # generate's next turn (whole sequence + the previous cache) does what a hand-written continuation on the same
    # cache does: the turn's tokens fed at their true positions, then greedy steps.
    model = varied_llama()
    first, turn = prompt(100, seed=1), prompt(8, seed=2)
    with kvcake.compress(model, build(36)):
        expected = turns(model, first, [turn])
        out = model.generate(first, max_new_tokens=6, **SETTINGS)
        cache, seq = out.past_key_values, torch.cat([out.sequences, turn], dim=1)
        fed = cache.get_seq_length()
        with torch.no_grad():
            step = model(seq[:, fed:], cache=cache, position_ids=torch.arange(fed, seq.shape[1])[None])
            tokens = []
            for position in range(seq.shape[1], seq.shape[1] + 6):
                token = step.logits[:, -1:].argmax(-1)
                tokens.append(int(token))
                step = model(token, cache=cache, position_ids=torch.tensor([[position]]))
    assert expected[1] == [tokens]


def test_a_chat_through_the_text_generation_pipeline_gives_the_plain_models_answers(chat_model_dir):
    # Messages in, the chat template applied by transformers' pipeline, two turns.
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def talk():
        messages = [{"role": "user", "content": "The blue lighthouse keeps the code 7319. " * 20 + "The code?"}]
        replies = []
        for question in ("And again?", None):
            out = chat(messages, max_new_tokens=6, do_sample=False)
            messages = out[0]["generated_text"]
            replies.append(messages[-1]["content"])
            if question:
                messages = [*messages, {"role": "user", "content": question}]
        return replies

    expected = talk()
    with kvcake.compress(model, kvcake.SnapKV(budget=COVER, window=8)) as press:
        assert talk() == expected
        assert press.report.prompt_tokens[0] > 200


# -- a kvcake cache is never read as a plain one -----------------------------------------------------------------------
@pytest.mark.parametrize("budget", [COVER, 60], ids=["covering", "evicting"])
def test_a_cache_from_the_block_is_refused_after_it(budget):
    # It used to be read as a plain cache: a covering budget's slot buffers (free slots included) gave other tokens,
    # an evicting one garbage, without a word.
    model = varied_llama()
    first, turn = prompt(120, seed=1), prompt(8, seed=2)
    with kvcake.compress(model, kvcake.CAKE(budget=budget, window=8)):
        out = model.generate(first, max_new_tokens=6, **SETTINGS)
        kept = model(first[:, :50]).past_key_values  # a prefill-only request, no decoding buffers
    ids = torch.cat([out.sequences, turn], dim=1)
    with pytest.raises(UnsupportedCacheError, match="inside a kvcake.compress block"):
        model.generate(ids, cache=out.past_key_values, max_new_tokens=4, do_sample=False)
    with pytest.raises(UnsupportedCacheError, match="inside a kvcake.compress block"):
        model(turn, cache=kept)


def test_an_empty_kvcake_cache_is_refused_outside_a_block():
    model = varied_llama()
    with kvcake.compress(model, kvcake.CAKE(budget=30, window=8)) as press:
        cache = press.new_cache()
    with pytest.raises(UnsupportedCacheError, match="inside a kvcake.compress block"):
        model(prompt(40), cache=cache)


def test_a_cache_goes_on_in_a_new_block_with_an_equal_method_and_nowhere_else():
    model, other = varied_llama(), varied_llama(seed=3)
    first, turn = prompt(100, seed=1), prompt(8, seed=2)
    with kvcake.compress(model, kvcake.CAKE(budget=40, window=8)):
        expected = turns(model, first, [turn])
        out = model.generate(first, max_new_tokens=6, **SETTINGS)
    ids = torch.cat([out.sequences, turn], dim=1)
    cache = out.past_key_values
    with kvcake.compress(model, kvcake.SnapKV(budget=40, window=8)), pytest.raises(UnsupportedCacheError,
                                                                                   match="equal method"):
        model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
    with kvcake.compress(other, kvcake.CAKE(budget=40, window=8)), pytest.raises(UnsupportedCacheError,
                                                                                 match="another model"):
        other.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
    with kvcake.compress(model, kvcake.CAKE(budget=40, window=8)):
        with pytest.raises(UnsupportedCacheError, match="inside a kvcake.compress block"):
            other(turn, cache=cache)  # the other model, outside any block, while this one's block is on
        again = model.generate(ids, cache=cache, max_new_tokens=6, **SETTINGS)
    assert again.sequences[:, ids.shape[1]:].tolist() == expected[1]


def test_a_block_left_by_an_exception_leaves_no_cache_usable_outside():
    model = varied_llama()
    cache = DynamicCache()
    with pytest.raises(ZeroDivisionError), kvcake.compress(model, kvcake.CAKE(budget=30, window=8)):
        model(prompt(50), cache=cache)
        raise ZeroDivisionError
    with pytest.raises(UnsupportedCacheError):
        model(prompt(3), cache=cache)


def test_a_forward_that_raised_leaves_its_cache_unfed():
    # The block marks a cache as fed for the duration of its forward only, also when the forward raises: another
    # model's forward inside the block must not read it.
    model, other = varied_llama(), varied_llama(seed=3)
    with kvcake.compress(model, kvcake.CAKE(budget=30, window=8)) as press:
        cache = press.new_cache()
        model(prompt(50), cache=cache)
        with pytest.raises(RuntimeError):
            model(prompt(4, seed=2), cache=cache, position_ids=torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(UnsupportedCacheError, match="inside a kvcake.compress block"):
            other(prompt(3), cache=cache)


# -- cropping: prompt-lookup and assisted decoding ---------------------------------------------------------------------
def repetitive(length: int = 40, times: int = 3) -> torch.Tensor:
    """A prompt whose n-grams recur, so that prompt-lookup decoding proposes draft tokens."""
    return prompt(length, seed=8).repeat(1, times)


def count_crops(monkeypatch) -> list[int]:
    counts: list[int] = []
    crop = kvcake.KVCakeCache.crop

    def spy(self, n):
        counts.append(n)
        return crop(self, n)

    monkeypatch.setattr(kvcake.KVCakeCache, "crop", spy)
    return counts


@pytest.mark.parametrize("build", [
    pytest.param(lambda: kvcake.SnapKV(budget=40, window=8), id="snapkv"),
    pytest.param(lambda: kvcake.PyramidKV(budget=40, window=8), id="pyramidkv"),
    pytest.param(lambda: kvcake.CAKE(budget=40, window=8, decode_eviction=False), id="cake-prefill-only"),
])
def test_prompt_lookup_decoding_gives_the_tokens_of_greedy_decoding(build, monkeypatch):
    # Cropping a compressed cache was refused (NotImplementedError) once anything was evicted.
    model = varied_llama()
    ids = repetitive()
    with kvcake.compress(model, build()):
        expected = model.generate(ids, max_new_tokens=20, do_sample=False)
        crops = count_crops(monkeypatch)
        got = model.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4)
    assert got.tolist() == expected.tolist()
    assert any(n < 0 for n in crops)  # some draft tokens were rejected and cropped away


def test_assisted_generation_gives_the_tokens_of_greedy_decoding(monkeypatch):
    model, assistant = varied_llama(), varied_llama(seed=5)
    ids = prompt(90, seed=1)
    with kvcake.compress(model, kvcake.SnapKV(budget=40, window=8)):
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
        crops = count_crops(monkeypatch)
        got = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert got.tolist() == expected.tolist()
    assert any(n < 0 for n in crops)


@pytest.mark.parametrize("budget", [40, COVER], ids=["evicting", "covering"])
@pytest.mark.parametrize("draft", ["prompt-lookup", "assistant"])
def test_draft_tokens_under_decode_time_eviction_are_refused_with_kvcakes_error(budget, draft):
    # Draft tokens make the layers evict (or, with a covering budget, would once the budget stops covering); a
    # rejected draft's evictions cannot be undone. It used to fail with a NotImplementedError mid-generation.
    model = varied_llama()
    extra = {"prompt_lookup_num_tokens": 4} if draft == "prompt-lookup" else {"assistant_model": varied_llama(seed=5)}
    with kvcake.compress(model, kvcake.CAKE(budget=budget, window=8)), pytest.raises(UnsupportedCacheError,
                                                                                     match="decode-time eviction"):
        model.generate(repetitive(), max_new_tokens=20, do_sample=False, **extra)


def test_a_cache_under_decode_time_eviction_says_it_cannot_be_cropped():
    # transformers asks is_croppable before decoding with drafts on a cache.
    model = varied_llama()
    with kvcake.compress(model, kvcake.CAKE(budget=40, window=8)) as press:
        assert not press.new_cache().is_croppable
    with kvcake.compress(model, kvcake.SnapKV(budget=40, window=8)) as press:
        assert press.new_cache().is_croppable


@pytest.mark.parametrize("freeze", [False, True], ids=["prefill-layout", "decoding-buffers"])
def test_cropping_restores_the_layers_as_they_were_before_the_tokens(freeze):
    model = varied_llama()
    with kvcake.compress(model, kvcake.SnapKV(budget=30, window=8)) as press, torch.no_grad():
        cache = press.new_cache(8)
        model(prompt(80), cache=cache)
        if freeze:
            model(prompt(1, seed=3), cache=cache, position_ids=torch.tensor([[80]]))
        before = [layer.entries() for layer in cache.layers_in_order()]
        length = cache.get_seq_length()
        if freeze:  # single tokens: the layers stay in their decoding buffers
            for i, token in enumerate(prompt(5, seed=4)[0]):
                model(token.view(1, 1), cache=cache, position_ids=torch.tensor([[length + i]]))
            assert all(layer.slots is not None for layer in cache.layers_in_order())
        else:
            model(prompt(5, seed=4), cache=cache, position_ids=torch.arange(length, length + 5)[None])
        cache.crop(-5)
        assert cache.get_seq_length() == length
        for (k0, v0, p0), (k1, v1, p1) in zip(before, (layer.entries() for layer in cache.layers_in_order()),
                                              strict=True):
            assert torch.equal(p0, p1) and torch.equal(k0, k1) and torch.equal(v0, v1)
        with pytest.raises(UnsupportedCacheError, match="compressed prompt"):
            cache.crop(-(length - 40))


# -- the case on the embedded model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_chat_over_a_needle_context_on_the_embedded_model():
    # ~800 tokens of haystack with a needle, 8 greedy tokens per turn, three turns fed the way transformers documents
    # it. The second turn used to fail inside the block, and the cache gave other tokens (covering budget) or garbage
    # (half the cache) on the plain model after the block, without a word.
    from kvcake.models import load
    from kvcake.needle import needle_case

    model, tokenizer = load("smollm2-135m-instruct")
    case = needle_case(tokenizer, 800, 0.5)
    first = tokenizer.apply_chat_template([{"role": "user", "content": f"{case.context}\n\n{case.question}"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    follow = ["Repeat the number, please.", "And once more?"]
    more = [tokenizer(f"<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt",
                      add_special_tokens=False)["input_ids"] for q in follow]
    ids = first["input_ids"]
    assert 750 < ids.shape[1] < 1000
    expected = turns(model, ids, more, new=8)
    assert case.answer[:2] in tokenizer.decode(expected[0][0])  # the model reads the needle (8 tokens: its start)
    with kvcake.compress(model, kvcake.CAKE(budget=100000)):
        assert turns(model, ids, more, new=8) == expected
    with kvcake.compress(model, kvcake.CAKE(ratio=0.5)) as press:
        out = model.generate(ids, max_new_tokens=8, **SETTINGS)
        answers = turns(model, ids, more, new=8)
        assert all(a[0] for a in answers)  # every turn answered
        assert press.report.kept_now == press.report.budgets
    with pytest.raises(UnsupportedCacheError, match="inside a kvcake.compress block"):
        model.generate(torch.cat([out.sequences, more[0]], 1), cache=out.past_key_values, max_new_tokens=8,
                       do_sample=False)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [COVER, 40], ids=["covering", "evicting"])
def test_three_turns_under_compiled_decoding_give_the_eager_blocks_tokens(budget):
    # Compiled steps do not update the host's lengths, and a turn thawed the layers out of their decoding buffers:
    # the second turn's mask was sized from a stale length, and its first compiled step met a thawed layer.
    from kvcake.engines.transformers.compiled import CompileCounts

    model = varied_llama()
    first, more = prompt(100, seed=1), [prompt(8, seed=2), prompt(5, seed=3)]
    with kvcake.compress(model, kvcake.CAKE(budget=budget, window=8)):
        expected = turns(model, first, more)
    CompileCounts.start()
    with kvcake.compress(model, kvcake.CAKE(budget=budget, window=8), compile=True):
        assert turns(model, first, more) == expected
    assert CompileCounts.read().graph_breaks == 0
