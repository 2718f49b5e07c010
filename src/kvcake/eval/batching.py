"""Answering several samples at once: one left-padded prefill, every setting replayed from it, batched decoding.

The rows of a batch are samples of one task, mode and protocol. They are left-padded to the longest, prefilled
together once (each row compressed as if it ran alone: the engine reads the padding from the attention mask), and
every setting's cache is replayed from that batched record (:mod:`kvcake.engines.transformers.replay`). Decoding is
greedy with a stop per row: a row that is done leaves the batch (the cache drops its row), and the loop ends when
every row is done or at the answer length. In the query-agnostic mode the question is fed to the compressed cache in
one chunk, so a batch holds only questions of one token length (tokens fed after the prefill are always attended:
padding inside a fed chunk would be seen).

What a row reports is what it would report alone: the memory figures are counted per row as a batch of one holds
them (:func:`row_memory`, :func:`row_end_bytes`), not the padded batch's tensors. The model's outputs for a padded
row differ from its outputs alone only by floating-point rounding: attention over a longer key axis, partly
masked, sums the same terms in another order (the projections and MLPs are row-exact; see docs/evaluation.md).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvcake.engines.transformers.cache import KVCakeCache
from kvcake.engines.transformers.compat import cache_keyword
from kvcake.engines.transformers.replay import PrefillRecord, queries_needed, record_prefill, replay
from kvcake.engines.transformers.sizing import decode_capacity, entry_bytes, full_attention_only, row_plan
from kvcake.eval.answering import answer_settings, attached, size_for_answer, tail_tokens
from kvcake.eval.grid import Setting
from kvcake.eval.prompts import Encoded, encode
from kvcake.eval.sample import Sample

Result = dict[str, Any] | Exception


def batchable(model) -> bool:
    """Whether the model's cache has only plain full-attention layers (sliding-window layers keep transformers' own
    bounded cache, whose per-row figures are not counted here: such models answer one sample at a time)."""
    return full_attention_only(model)


# -- per-row memory figures -------------------------------------------------------------------------------------------
def row_lengths(cache, valid: torch.Tensor) -> list[list[int]]:
    """``[row][layer]`` entries each compressed layer holds for each row, as a batch of one stores them: the real
    tokens of the row's longest KV head (padding and filler slots left out). ``valid`` ``(B, S)``: the prompt's
    non-padding columns."""
    per_layer = []
    for layer in cache.layers_in_order():
        positions = layer.position_table()  # (B, H, L), -1 for fillers
        batch, heads, length = positions.shape
        inside = (positions >= 0) & (positions < valid.shape[1])
        where = positions.clamp(0, valid.shape[1] - 1).reshape(batch, -1)
        prompt_real = valid.to(positions.device).gather(1, where).view(batch, heads, length)
        real = (positions >= valid.shape[1]) | (inside & prompt_real)
        per_layer.append(real.sum(-1).max(-1).values.tolist())
    return [list(row) for row in zip(*per_layer, strict=True)]


def row_memory(cache, row: int, lengths: list[int], held: list[list[int]] | None) -> dict[str, Any]:
    """The after-prefill figures of one row (:func:`kvcake.eval.answering._memory` of a batch of one): KV bytes,
    full-cache bytes, tokens kept per layer and CAKE's preferences. ``lengths``: real prompt tokens per row;
    ``held``: :func:`row_lengths` of a compressed cache."""
    if isinstance(cache, KVCakeCache):
        assert held is not None
        report = cache.report()
        entry = [entry_bytes(layer) for layer in cache.layers_in_order()]
        return {"kv_bytes": sum(n * e for n, e in zip(held[row], entry, strict=True)),
                "kv_bytes_full": lengths[row] * sum(entry), "layer_kept": report.kept_after_prefill[row],
                "layer_preferences": report.preferences[row]}
    full = lengths[row] * sum(entry_bytes(layer) for layer in cache.layers)
    return {"kv_bytes": full, "kv_bytes_full": full, "layer_kept": [lengths[row]] * len(cache.layers),
            "layer_preferences": None}


def row_end_bytes(cache, plan, row: int, held: list[int], fed: int, grown: int, horizon: int) -> int:
    """KV bytes a batch of one holds after its answer: ``held`` entries per layer before decoding (after the question
    in the query-agnostic mode), then ``fed`` tokens decoded one at a time, ``grown`` tokens having been fed past the
    prompt before, with buffers sized for ``horizon`` tokens (:func:`~kvcake.eval.answering.size_for_answer`);
    ``plan``: the batch's decode plan before decoding (a copy: finished rows leave the cache's own).

    A full cache holds every token. A compressed one that decoded holds fixed-shape buffers sized once for the row
    alone, by the engine's rule (:func:`~kvcake.engines.transformers.sizing.decode_capacity`).
    ``tests/test_eval_batch.py`` checks the figure against the unbatched runner's, which measures its cache.
    """
    if not isinstance(cache, KVCakeCache):
        return (held[0] + fed) * sum(entry_bytes(layer) for layer in cache.layers)
    entry = [entry_bytes(layer) for layer in cache.layers_in_order()]
    if fed == 0:  # never frozen: the prefill layout, as long as the longest head
        return sum(n * e for n, e in zip(held, entry, strict=True))
    alone = row_plan(plan, row) if cache.method.decode_eviction else None
    capacity = decode_capacity(cache.method, alone, held, grown, horizon)
    return sum(n * e for n, e in zip(capacity, entry, strict=True))


# -- the batch --------------------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    """A batch's shared prefill."""

    samples: list[Sample]
    encs: list[Encoded]
    ids: torch.Tensor  # (B, S) left-padded prefill
    mask: torch.Tensor  # (B, S) 1 on real tokens
    lengths: list[int]  # real prefill tokens per row
    rest: torch.Tensor | None  # (B, q) the question (query-agnostic mode)
    limits: list[int]
    methods: list[Any]
    recorded: int
    record: PrefillRecord
    first_cache: Any
    seconds: float


def _pad_id(tokenizer, eos: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else (eos[0] if eos else 0)


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - r.shape[1]:] = r[0]
        mask[i, longest - r.shape[1]:] = 1
    return ids, mask


def _prefill(model, tokenizer, samples: list[Sample], encs: list[Encoded], settings: list[Setting], mode: str,
             tail: int, limits: list[int], pad: int) -> _Batch:
    device = next(model.parameters()).device
    aware = mode == "query-aware"
    parts = [torch.cat([e.context_ids, e.question_ids], dim=1) if aware else e.context_ids for e in encs]
    ids, mask = left_pad(parts, pad)
    rest = None
    if not aware and encs[0].question_ids.shape[1]:
        rest = torch.cat([e.question_ids for e in encs], dim=0).to(device)
    methods = [s.build() for s in settings]
    recorded = next((i for i, m in enumerate(methods) if m is not None), 0)
    start = time.perf_counter()
    record, first = record_prefill(model, ids.to(device), methods[recorded], queries=queries_needed(methods),
                                   tail=tail, attention_mask=mask.to(device))
    return _Batch(samples, encs, ids.to(device), mask.to(device), [p.shape[1] for p in parts], rest, limits, methods,
                  recorded, record, first, time.perf_counter() - start)


def _next_feed(nxt: list[int], active: list[int], tokens: list[list[int]], limits: list[int],
               stop: set[int]) -> list[int]:
    """Append each active row's next token; returns the active rows that go on (their token is fed back)."""
    going = []
    for r, token in zip(active, nxt, strict=True):
        if token in stop or len(tokens[r]) >= limits[r]:
            continue
        tokens[r].append(token)
        if len(tokens[r]) < limits[r]:
            going.append(r)
    return going


@torch.no_grad()
def _decode(model, cache, logits: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, method,
            limits: list[int], eos: list[int]) -> tuple[list[list[int]], list[int]]:
    """Greedy answers of every row with its own stop (:func:`kvcake.eval.answering.greedy` per row); returns the
    tokens and how many of them each row fed back (its last token is not fed when it reaches its answer length).

    A row that is done leaves the batch (``cache.batch_select_indices``), so the steps that remain cost only the
    rows still answering; ``tests/test_row_selection.py`` checks that the rows that remain decode as before.
    """
    size_for_answer(cache, max(limits))
    stop = set(eos)
    tokens: list[list[int]] = [[] for _ in limits]
    active = list(range(len(limits)))
    keyword = cache_keyword(model)
    nxt = logits.argmax(-1).tolist()
    with attached(model, method):
        while True:
            going = _next_feed(nxt, active, tokens, limits, stop)
            if not going:
                break
            if len(going) < len(active):  # finished rows leave the batch
                where = torch.tensor([active.index(r) for r in going], device=mask.device)
                cache.batch_select_indices(where)
                mask, positions = mask[where], positions[where]
                active = going
            step = torch.tensor([tokens[r][-1] for r in active], device=mask.device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            out = model(input_ids=step, attention_mask=mask, position_ids=positions[:, None], **{keyword: cache},
                        use_cache=True, logits_to_keep=1)
            positions = positions + 1
            nxt = out.logits[:, -1].argmax(-1).tolist()
    # every token was fed back but the last of a row that reached its length
    fed = [len(t) - int(0 < len(t) == n) for t, n in zip(tokens, limits, strict=True)]
    return tokens, fed


@torch.no_grad()
def _answer(model, tokenizer, batch: _Batch, i: int, eos: list[int]) -> list[dict[str, Any]]:
    """The ``i``-th setting's answers for every row of the batch, with each row's own figures."""
    begin = time.perf_counter()
    method = batch.methods[i]
    cache = batch.first_cache if i == batch.recorded else replay(model, batch.record, method)
    valid = batch.mask.bool()
    compressed = isinstance(cache, KVCakeCache)
    held = row_lengths(cache, valid) if compressed else None
    memory = [row_memory(cache, r, batch.lengths, held) for r in range(len(batch.samples))]
    logits, mask = batch.record.logits, batch.mask
    positions = torch.tensor(batch.lengths, device=mask.device)
    grown = 0
    if batch.rest is not None:
        q = batch.rest.shape[1]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], q)], dim=1)
        where = positions[:, None] + torch.arange(q, device=mask.device)
        with attached(model, method):
            out = model(input_ids=batch.rest, attention_mask=mask, position_ids=where,
                        **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        positions, grown = positions + q, q
        if compressed:
            held = row_lengths(cache, valid)
    # the rows' decode plans, before finished rows leave the batch
    plan = copy.deepcopy(cache.plan) if isinstance(cache, KVCakeCache) else None
    tokens, fed = _decode(model, cache, logits, mask, positions, method, batch.limits, eos)
    seconds = (time.perf_counter() - begin + batch.seconds / len(batch.methods)) / len(batch.samples)
    results = []
    for r, enc in enumerate(batch.encs):
        before = held[r] if held is not None else [batch.lengths[r] + grown]
        results.append({
            "prediction": tokenizer.decode(tokens[r], skip_special_tokens=True), "generated_tokens": len(tokens[r]),
            "prompt_tokens": enc.length, "compressed_tokens": batch.lengths[r], "truncated_tokens": enc.truncated,
            "seconds": round(seconds, 3), **memory[r],
            "kv_bytes_end": row_end_bytes(cache, plan, r, before, fed[r], grown, max(1, batch.limits[r])),
        })
    return results


def answer_batch(model, tokenizer, samples: list[Sample], settings: list[Setting], mode: str, eos: list[int],
                 max_length: int | None = None, max_new_tokens: int | None = None,
                 protocol: str = "whole") -> Iterator[tuple[Sample, Setting, Result]]:
    """Answer every sample under every setting, the samples as one batch (see the module docstring).

    Yields ``(sample, setting, result)``, ``result`` being the exception when that answer failed. A sample whose
    prompt cannot be built fails alone; when the batched prefill, or one setting's batched answer, raises, the
    samples concerned are answered one at a time (:func:`~kvcake.eval.answering.answer_settings`), so that a
    failure is recorded for the sample it belongs to. So are the settings whose observation window reaches past
    the shortest row's first token.
    """
    if len(samples) == 1:
        for setting, result in answer_settings(model, tokenizer, samples[0], settings, mode, eos, max_length,
                                               max_new_tokens, protocol):
            yield samples[0], setting, result
        return
    ready: list[tuple[Sample, Encoded, int]] = []
    for sample in samples:
        limit = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
        try:
            ready.append((sample, encode(tokenizer, sample, None if max_length is None else max_length - limit),
                          limit))
        except Exception as exc:  # noqa: BLE001 - recorded per sample by the caller
            for setting in settings:
                yield sample, setting, exc
    if len(ready) < 2:
        for sample, _, _ in ready:
            yield from answer_batch(model, tokenizer, [sample], settings, mode, eos, max_length, max_new_tokens,
                                    protocol)
        return
    tail = tail_tokens(tokenizer, ready[0][0], mode, protocol)
    shortest = min(e.context_ids.shape[1] + (e.question_ids.shape[1] if mode == "query-aware" else 0)
                   for _, e, _ in ready)
    # A setting whose observation window (plus the tail) reaches past a row's start would see that row's padding
    # in its window: such settings are answered one sample at a time.
    alone = [s for s in settings if s.method != "full" and s.build().window + tail >= shortest]
    together = [s for s in settings if s not in alone]
    pad = _pad_id(tokenizer, eos)
    members = [s for s, _, _ in ready]
    if together:
        try:
            batch = _prefill(model, tokenizer, members, [e for _, e, _ in ready], together, mode, tail,
                             [n for _, _, n in ready], pad)
        except Exception:  # noqa: BLE001 - answered one at a time, where a failure belongs to one sample
            alone, together = settings, []
    for i, setting in enumerate(together):
        try:
            results = _answer(model, tokenizer, batch, i, eos)
        except Exception:  # noqa: BLE001
            alone.append(setting)
            continue
        for sample, result in zip(members, results, strict=True):
            yield sample, setting, result
    if alone:
        for sample in members:
            yield from answer_batch(model, tokenizer, [sample], alone, mode, eos, max_length, max_new_tokens,
                                    protocol)
