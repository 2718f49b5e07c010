"""Trying to break the library: random sequences of API calls inside and outside compress blocks.

Every request is checked against a run without kvcake: at a budget covering prompt and answer the tokens must be
identical; at a small budget the cache must hold its budget (kept = budgets while decoding, prefill peak within the
cascade's bound). Failures must be clean errors, and nothing may leak from one request or block into the next.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import kvcake
from conftest import tiny_llama
from kvcake.engines.transformers.cache import UnsupportedCacheError

MODEL = tiny_llama("sdpa", layers=2, seed=3)
COVERING = kvcake.CAKE(budget=10**6, window=8)


def method(kind: str, small: bool):
    budget = 24 if small else 10**6
    return {"cake": kvcake.CAKE(budget=budget, window=8), "snapkv": kvcake.SnapKV(budget=budget, window=8),
            "h2o": kvcake.H2O(budget=budget), "tova": kvcake.TOVA(budget=budget)}[kind]


def ids_of(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random prompts of the given lengths, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), longest), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, : longest - n] = 0
        ids[row, : longest - n] = 0
    return ids, mask


def reference(ids, mask, new):
    return MODEL.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)


class Boom(LogitsProcessor):
    """Raises at a given step: an exception in the middle of generate."""

    def __init__(self, at: int):
        self.at, self.seen = at, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("boom")
        return scores


def hand_loop(ids, cache, steps):
    tokens = []
    with torch.no_grad():
        out = MODEL(ids, cache=cache)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            out = MODEL(token, cache=cache)
    return tokens


request = st.fixed_dictionaries({
    "kind": st.sampled_from(["generate", "loop", "prefix", "boom"]),
    "method": st.sampled_from(["cake", "snapkv", "h2o", "tova"]),
    "small": st.booleans(),
    "lengths": st.lists(st.integers(20, 70), min_size=1, max_size=3),
    "new": st.integers(1, 10),
    "seed": st.integers(0, 10**6),
})


def prefix_cache(spec):
    """A plain cache holding a prefix, filled outside any block (inside one, the forward would compress it)."""
    ids, _ = ids_of(spec["lengths"], spec["seed"])
    prefix = DynamicCache()
    with torch.no_grad():
        MODEL(ids[:1, -10:], cache=prefix)
    return prefix


def run_request(press, spec, small, prefix=None):
    ids, mask = ids_of(spec["lengths"], spec["seed"])
    new = spec["new"]
    if spec["kind"] == "prefix":  # a cache holding a prefix is refused, never run uncompressed
        with pytest.raises(UnsupportedCacheError):
            MODEL.generate(ids[:1], cache=prefix, max_new_tokens=new, do_sample=False)
        assert prefix.get_seq_length() == 10  # left as it was
        return
    if spec["kind"] == "boom":
        with pytest.raises(RuntimeError, match="boom"):
            MODEL.generate(ids, attention_mask=mask, max_new_tokens=new + 2, do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([Boom(2)]))
        return
    if spec["kind"] == "loop":
        ids = ids[:1, ids.shape[1] - spec["lengths"][0]:]  # one row, no padding
        cache = DynamicCache()
        got = hand_loop(ids, cache, new)
        if not small:
            assert got == hand_loop(ids, DynamicCache(), new)
        check_report(press.report, small, rows=1, budget=press.method.budget)
        return
    out = MODEL.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    if not small:
        assert torch.equal(out, reference(ids, mask, new))
    check_report(press.report, small, rows=ids.shape[0], budget=press.method.budget)


def check_report(report, small, rows, budget):
    assert len(report.prompt_tokens) == rows
    if small:
        assert report.peak_kv_bytes <= report.peak_bound_bytes + report.padding_bytes
        if report.method["decode_eviction"]:
            for row, kept in enumerate(report.kept_now):
                assert sum(kept) <= budget * len(kept)  # the whole budget, never more
                if report.prompt_tokens[row] > budget:  # nothing to grow into: every layer at its budget
                    assert kept == report.budgets[row]


@settings(max_examples=25, deadline=None)
@given(blocks=st.lists(st.tuples(st.sampled_from(["cake", "snapkv", "h2o", "tova"]), st.booleans(),
                                 st.lists(request, min_size=1, max_size=3)), min_size=1, max_size=3))
def test_random_sequences_of_requests(blocks):
    for kind, small, requests in blocks:
        prefixes = [prefix_cache(spec) if spec["kind"] == "prefix" else None for spec in requests]
        with kvcake.compress(MODEL, method(kind, small)) as press:
            for spec, prefix in zip(requests, prefixes, strict=True):
                run_request(press, spec, small, prefix)
        # the block leaves nothing behind
        assert MODEL.config._attn_implementation == "sdpa" and not MODEL._forward_pre_hooks
        assert "generate" not in MODEL.__dict__
    ids, mask = ids_of([30, 45], 1)
    assert torch.equal(reference(ids, mask, 4), MODEL.generate(ids, attention_mask=mask, max_new_tokens=4,
                                                               min_new_tokens=4, do_sample=False, pad_token_id=0))


def test_an_exception_inside_the_block_restores_the_model():
    with pytest.raises(ValueError, match="inside"), kvcake.compress(MODEL, COVERING):
        raise ValueError("inside")
    assert MODEL.config._attn_implementation == "sdpa" and not MODEL._forward_pre_hooks
    assert "generate" not in MODEL.__dict__


def test_nested_blocks_are_refused():
    with kvcake.compress(MODEL, COVERING), pytest.raises(RuntimeError, match="nest"), kvcake.compress(MODEL, COVERING):
        pass
    assert MODEL.config._attn_implementation == "sdpa"
