"""The embedded pretrained model (SmolLM2-135M-Instruct) on a single-needle question at about 2K tokens.

The case (depth 4/9, seed 4) is one of the ten of ``benchmarks/needle_retention.py``; retrieval rates over all
depths are measured there, not asserted here.
"""

import pytest
import torch

import kvcake
from kvcake import models
from kvcake.needle import needle_case
from kvcake.pipeline import answer, build_prompt

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm():
    return models.load()


@pytest.fixture(scope="module")
def case(smollm):
    _, tokenizer = smollm
    return needle_case(tokenizer, 2000, depth=4 / 9, seed=4)


@pytest.fixture(scope="module")
def full(smollm, case):
    model, tokenizer = smollm
    return answer(model, tokenizer, case.context, case.question, None, max_new_tokens=NEW_TOKENS)


def test_full_cache_retrieves_the_needle(full, case):
    assert 1900 <= full.prompt_tokens <= 2400
    assert case.answer in full.answer


@pytest.mark.parametrize("method", [
    kvcake.CAKE(budget=2400 + NEW_TOKENS),  # covers prompt and answer: decode-time eviction never triggers
    kvcake.CAKE(ratio=1.0, decode_eviction=False),  # covers the prompt, nothing evicted at prefill
], ids=["budget-covers-prompt-and-answer", "ratio-1-prefill-only"])
def test_covering_budget_is_identical_to_full_cache(smollm, case, full, method):
    model, tokenizer = smollm
    ids = build_prompt(tokenizer, case.context, case.question)
    reference = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with kvcake.compress(model, method) as press:
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, reference)
    assert press.report.kept_after_prefill == [[full.prompt_tokens] * 30]


def test_half_the_cache_still_retrieves_the_needle(smollm, case, full):
    model, tokenizer = smollm
    result = answer(model, tokenizer, case.context, case.question, kvcake.CAKE(ratio=0.5), max_new_tokens=NEW_TOKENS)
    assert case.answer in result.answer
    assert sum(result.layer_budgets) == round(0.5 * full.prompt_tokens * 30)
    assert result.kv_bytes < 0.55 * result.kv_bytes_full
    assert result.peak_kv_bytes < result.kv_bytes_full
