"""Answering a sample under every setting of the grid, from one shared prefill.

For every sample the prompt is prefilled once and every method's cache is rebuilt from that prefill
(:mod:`kvcake.engines.transformers.replay`), which is exact: the compressed prefill gives the same cache as a
forward under that method. Answers are greedy. Two modes:

* ``query-aware`` (the paper's setting): the whole prompt, question included, is prefilled and compressed;
* ``query-agnostic``: the context is prefilled and compressed alone, then the question is fed to the compressed
  cache, as a server that compresses a document before knowing the question would.

And two protocols (:data:`PROTOCOLS`): ``whole`` compresses the whole templated prompt (the paper's protocol);
``tail`` leaves the tokens the chat template adds after the user's message uncompressed (kvpress's protocol,
:func:`kvcake.pipeline.chat_tail_length`). In the query-agnostic mode that tail belongs to the question, which is
fed after the compression anyway, so both protocols answer alike there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvcake.engines.transformers.cache import KVCakeCache
from kvcake.engines.transformers.compat import cache_keyword
from kvcake.engines.transformers.replay import queries_needed, record_prefill, replay
from kvcake.engines.transformers.session import compress
from kvcake.engines.transformers.storage import cache_kv_bytes
from kvcake.eval.grid import MODES, PROTOCOLS, Setting
from kvcake.eval.prompts import Encoded, answer_prefix_length, encode
from kvcake.eval.sample import Sample


def attached(model, method):
    """``method`` attached to ``model`` for a block (nothing for the full cache)."""
    return compress(model, method) if method is not None else contextlib.nullcontext()


def size_for_answer(cache, max_new_tokens: int) -> None:
    """Tell a compressed ``cache`` how many tokens will be decoded, before its first single-token step: its decoding
    buffers are then sized once for the whole answer (``KVCakeCache.decode_horizon``, which ``generate`` sets from
    ``max_new_tokens``) and never regrown while decoding."""
    if isinstance(cache, KVCakeCache) and cache.decode_horizon is None:
        cache.decode_horizon = max(1, max_new_tokens)


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, position: int, method, max_new_tokens: int,
           eos: Iterable[int]) -> list[int]:
    """Greedy continuation from ``logits`` (the last prompt position's) with ``cache`` holding ``position`` tokens.

    Positions are passed explicitly: a compressed cache holds fewer entries than the sequence is long. A compressed
    cache is told the answer length (:func:`size_for_answer`), as ``generate`` tells it ``max_new_tokens``.
    """
    size_for_answer(cache, max_new_tokens)
    stop = set(eos)
    tokens: list[int] = []
    keyword = cache_keyword(model)
    device = logits.device
    with attached(model, method):
        nxt = int(logits[0].argmax())
        while nxt not in stop and len(tokens) < max_new_tokens:
            tokens.append(nxt)
            if len(tokens) == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[nxt]], device=device),
                        position_ids=torch.tensor([[position]], device=device),
                        **{keyword: cache}, use_cache=True, logits_to_keep=1)
            position += 1
            nxt = int(out.logits[0, -1].argmax())
    return tokens


@torch.no_grad()
def feed(model, cache, ids: torch.Tensor, position: int, method) -> torch.Tensor:
    """Run ``ids`` on top of ``cache`` (the question after a compressed context); the last position's logits."""
    positions = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
    with attached(model, method):
        out = model(input_ids=ids, position_ids=positions, **{cache_keyword(model): cache}, use_cache=True,
                    logits_to_keep=1)
    return out.logits[:, -1].float()


@dataclass
class _Prefill:
    """One sample's shared prefill: what every setting's answer starts from."""

    enc: Encoded
    prefill_ids: torch.Tensor  # what was prefilled (and compressed)
    rest: torch.Tensor | None  # the question, fed afterwards in the query-agnostic mode
    methods: list[Any]  # one per setting (None for the full cache)
    recorded: int  # the setting whose cache the prefill itself built
    record: Any
    first_cache: Any
    limit: int  # answer length
    seconds: float


def tail_tokens(tokenizer, sample: Sample, mode: str, protocol: str) -> int:
    """Prompt tokens left uncompressed at the end of the prefill: the chat template's tail (and the answer prefix
    after it) under the ``tail`` protocol, for a query-aware sample prompted through the chat template; else none."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if protocol == "whole" or mode != "query-aware" or not (sample.chat and getattr(tokenizer, "chat_template", None)):
        return 0
    from kvcake.pipeline import chat_tail_length

    return chat_tail_length(tokenizer) + answer_prefix_length(tokenizer, sample)


def _prefill(model, tokenizer, sample: Sample, settings: list[Setting], mode: str, max_length: int | None,
             max_new_tokens: int | None, protocol: str = "whole") -> _Prefill:
    device = next(model.parameters()).device
    limit = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
    enc = encode(tokenizer, sample, None if max_length is None else max_length - limit)
    ctx, question = enc.context_ids.to(device), enc.question_ids.to(device)
    prefill_ids = torch.cat([ctx, question], dim=1) if mode == "query-aware" else ctx
    rest = None if mode == "query-aware" or question.shape[1] == 0 else question
    methods = [s.build() for s in settings]
    recorded = next((i for i, m in enumerate(methods) if m is not None), 0)
    start = time.perf_counter()
    record, first_cache = record_prefill(model, prefill_ids, methods[recorded], queries=queries_needed(methods),
                                         tail=tail_tokens(tokenizer, sample, mode, protocol))
    return _Prefill(enc, prefill_ids, rest, methods, recorded, record, first_cache, limit,
                    time.perf_counter() - start)


def _answer(model, tokenizer, pre: _Prefill, i: int, eos: list[int]) -> dict[str, Any]:
    """The ``i``-th setting's answer and what its cache held."""
    begin = time.perf_counter()
    method = pre.methods[i]
    cache = pre.first_cache if i == pre.recorded else replay(model, pre.record, method)
    after_prefill = _memory(cache)
    logits, position = pre.record.logits, pre.prefill_ids.shape[1]
    if pre.rest is not None:
        logits = feed(model, cache, pre.rest, position, method)
        position += pre.rest.shape[1]
    tokens = greedy(model, cache, logits, position, method, pre.limit, eos)
    return {
        "prediction": tokenizer.decode(tokens, skip_special_tokens=True), "generated_tokens": len(tokens),
        "prompt_tokens": pre.enc.length, "compressed_tokens": pre.prefill_ids.shape[1],
        "truncated_tokens": pre.enc.truncated,
        "seconds": round(time.perf_counter() - begin + pre.seconds / len(pre.methods), 3),
        **after_prefill, "kv_bytes_end": cache_kv_bytes(cache),
    }


def answer_settings(model, tokenizer, sample: Sample, settings: list[Setting], mode: str, eos: list[int],
                    max_length: int | None = None, max_new_tokens: int | None = None,
                    protocol: str = "whole") -> Iterator[tuple[Setting, dict[str, Any] | Exception]]:
    """Answer ``sample`` under every setting, sharing one prefill; prompts are cut to ``max_length`` tokens
    including the answer; ``protocol``: one of :data:`PROTOCOLS`.

    Yields ``(setting, result)`` per setting, ``result`` being the exception when that setting failed; a failed
    prefill fails every setting.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose {' or '.join(MODES)}")
    try:
        pre = _prefill(model, tokenizer, sample, settings, mode, max_length, max_new_tokens, protocol)
    except Exception as exc:  # noqa: BLE001 - recorded per sample by the caller
        for setting in settings:
            yield setting, exc
        return
    for i, setting in enumerate(settings):
        try:
            result: dict[str, Any] | Exception = _answer(model, tokenizer, pre, i, eos)
        except Exception as exc:  # noqa: BLE001
            result = exc
        yield setting, result


def _memory(cache) -> dict[str, Any]:
    """KV bytes of ``cache`` after prefill, and the tokens each layer kept (CAKE's preferences when it has them)."""
    if isinstance(cache, KVCakeCache):
        report = cache.report()
        return {"kv_bytes": report.kv_bytes, "kv_bytes_full": report.kv_bytes_full,
                "layer_kept": report.kept_after_prefill[0], "layer_preferences": report.preferences[0]}
    full = cache_kv_bytes(cache)
    return {"kv_bytes": full, "kv_bytes_full": full, "layer_kept": [layer.get_seq_length() for layer in cache.layers],
            "layer_preferences": None}
