"""Transformers rows: static batches as large as the KV pool allows, full cache or a kvcake method.

Requests are served in arrival order in batches. A batch is left-padded, prefilled in one forward (each row
compressed as if it ran alone, the engine reading the padding from the attention mask) and decoded greedily for
exactly the workload's answer length. The batch size is planned from what one request holds: for the full cache its
``prompt + answer`` tokens (a plain cache holds exactly that); for a kvcake method, the engine's figures for the
longest request, served alone for the whole answer before the clock starts (the most it held, its prefill peak
included: a method that evicts while decoding holds its budget, a prefill-only one grows by a token a step), then
the first batch's prefill at that size, since a batch's layers are as wide as their widest row: the batch shrinks
until that prefill, plus what its rows add while decoding, fits the pool. What the cache holds is then read from the
engine after every forward, and a batch that held more than the pool (a later batch whose rows differ more than the
first's) is reported as such (``within_pool``), never hidden.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from kvcake.bench.throughput.record import Clock, RequestRecord
from kvcake.bench.throughput.settings import Setting
from kvcake.bench.throughput.workload import Request
from kvcake.engines.transformers.cache import KVCakeCache
from kvcake.engines.transformers.compat import cache_keyword, text_config
from kvcake.engines.transformers.session import compress
from kvcake.engines.transformers.storage import cache_kv_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r)
        mask[i, longest - len(r):] = 1
    return ids.to(device), mask.to(device)


def _held(cache) -> tuple[int, int]:
    """KV bytes the cache holds now and the highest it held (a compressed prefill's peak included)."""
    now = cache_kv_bytes(cache)
    peak = cache.memory.peak_kv_bytes if isinstance(cache, KVCakeCache) else 0
    return now, max(now, peak)


class BatchRun:
    """Greedy decoding of one static batch, clocked: prefill forward, then single-token steps."""

    def __init__(self, model, method, pad: int, decode_text: Callable[[list[int]], str] | None = None) -> None:
        self.model = model
        self.method = method
        self.pad = pad
        self.decode_text = decode_text
        self.device = next(model.parameters()).device
        self.keyword = cache_keyword(model)

    def _cache(self, press, output_tokens: int):
        if press is None:
            return DynamicCache(config=text_config(self.model))
        return press.new_cache(max_new_tokens=output_tokens)

    @torch.no_grad()
    def run(self, rows: list[list[int]], output_tokens: int, clock: Clock | None, start: float,
            on_step: Callable[[], None] | None = None) -> tuple[list[list[int]], float, int, int]:
        """Decode ``rows``; returns each row's tokens, the time its first token came (from ``start``), the
        highest KV bytes held and the bytes held at the end. ``clock`` (None for an untimed probe) gets the phase
        seconds, tokens and samples."""
        ids, mask = _left_pad(rows, self.pad, self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        attached = compress(self.model, self.method) if self.method is not None else contextlib.nullcontext()
        with attached as press:
            cache = self._cache(press, output_tokens)
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self.keyword: cache})
            token = out.logits[:, -1].argmax(-1)
            _sync(self.device)
            first = time.perf_counter()
            now, peak = _held(cache)
            if clock is not None:
                clock.prefill_s += first - t0
                clock.steps += 1
                clock.sample(now, len(rows))
            tokens = [[int(t)] for t in token.tolist()]
            position = positions[:, -1] + 1
            for _ in range(output_tokens - 1):
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                t1 = time.perf_counter()
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                                 use_cache=True, logits_to_keep=1, **{self.keyword: cache})
                token = out.logits[:, -1].argmax(-1)
                for row, t in zip(tokens, token.tolist(), strict=True):
                    row.append(int(t))
                _sync(self.device)
                position = position + 1
                now, step_peak = _held(cache)
                peak = max(peak, step_peak)
                if clock is not None:
                    clock.decode_s += time.perf_counter() - t1
                    clock.decode_tokens += len(rows)
                    clock.steps += 1
                    clock.sample(now, len(rows))
                if on_step is not None:
                    on_step()
            if clock is not None:
                clock.kv_peak_bytes = max(clock.kv_peak_bytes, peak)
        return tokens, first - start, peak, now


def plan_batch(model, setting: Setting, method, requests: list[Request], output_tokens: int, pool: int,
               per_token: int, pad: int) -> tuple[int, int, dict[str, Any]]:
    """Largest batch the pool holds, and the bytes one request is planned at (see the module's docstring)."""
    longest = max(r.prompt_tokens for r in requests)
    if method is None:
        per_request = (longest + output_tokens) * per_token
        how: dict[str, Any] = {"planned_from": "prompt + answer tokens of the longest request x bytes per token"}
        return int(pool // per_request), int(per_request), how
    # The longest request served alone for the whole answer: the most KV it held at any point (its prefill peak
    # included) is what the method needs per request: growing by a token a step for a prefill-only method, held at
    # the budget by one that evicts while decoding.
    probe = BatchRun(model, method, pad)
    longest_request = max(requests, key=lambda r: r.prompt_tokens)
    _, _, peak_one, end_one = probe.run([longest_request.ids], output_tokens, None, time.perf_counter())
    _, _, _, prefilled_one = probe.run([longest_request.ids], 1, None, time.perf_counter())
    growth = max(end_one - prefilled_one, 0)  # what one request adds while decoding (0 when it holds its budget)
    how = {"planned_from": "engine figures of the longest request served alone for the whole answer, then of the "
                           "first batch's prefill, before the clock starts",
           "probe_peak_bytes": peak_one, "probe_end_bytes": end_one}
    batch = min(pool // peak_one if peak_one else 0, len(requests))
    # A batch holds more than its rows alone: each layer is as wide as its widest row (a method that splits the
    # budget by each request's own preference gives rows different widths). The first batch's prefill, probed at
    # the planned size, says by how much; the batch shrinks until it fits.
    queue = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    checks = []
    while batch > 1:
        _, _, peak, prefilled = probe.run([r.ids for r in queue[:batch]], 1, None, time.perf_counter())
        need = max(peak, prefilled + batch * growth)
        checks.append({"batch": int(batch), "prefill_peak_bytes": peak, "needed_bytes": need})
        if need <= pool:
            break
        batch = min(batch - 1, batch * pool // need)
    how["batch_checks"] = checks
    per_request = checks[-1]["needed_bytes"] // checks[-1]["batch"] if checks else peak_one
    return int(batch), int(max(per_request, peak_one)), how


def serve(model, tokenizer, setting: Setting, requests: list[Request], output_tokens: int, pool: int,
          per_token: int, progress: Callable[[int], None] | None = None,
          max_batch: int | None = None,
          deadline: float | None = None) -> tuple[list[RequestRecord], Clock, dict[str, Any]]:
    """Serve every request of the workload under ``setting`` (engine ``transformers``) within ``pool`` KV bytes.

    ``tokenizer`` None (random weights): padding id 0 and no needle check. ``deadline`` (a ``time.perf_counter``
    value): no batch starts after it; the requests left are marked as not started."""
    from kvcake.methods.registry import build

    method = None if setting.method == "full" else build(setting.method, ratio=setting.ratio)
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    batch, per_request, info = plan_batch(model, setting, method, requests, output_tokens, pool, per_token, pad)
    if max_batch is not None:
        batch = min(batch, max_batch)
    info.update(batch=batch, per_request_bytes=per_request)
    records = [RequestRecord(index=r.index, prompt_tokens=r.prompt_tokens, arrival_s=r.arrival_s) for r in requests]
    clock = Clock(kv_source="cache tensors after every forward (transformers cache_kv_bytes; kvcake's prefill peak)")
    if batch < 1:
        for rec in records:
            rec.refused = (f"one request needs {per_request / 2**20:.1f} MiB of KV, the pool holds "
                           f"{pool / 2**20:.1f} MiB: refused before running")
        return records, clock, info
    runner = BatchRun(model, method, pad)
    queue = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    start = time.perf_counter()
    while queue:
        if deadline is not None and time.perf_counter() > deadline:
            for r in queue:
                records[r.index].refused = "not started: the run's deadline passed"
            info["cut_at_deadline"] = len(queue)
            break
        now = time.perf_counter() - start
        if queue[0].arrival_s > now:
            time.sleep(queue[0].arrival_s - now)
            now = time.perf_counter() - start
        chosen = [r for r in queue if r.arrival_s <= now][:batch]
        queue = [r for r in queue if r not in chosen]
        try:
            tokens, first, _, _ = runner.run([r.ids for r in chosen], output_tokens, clock, start,
                                          on_step=(lambda: progress(0)) if progress else None)
        except torch.OutOfMemoryError as exc:
            for r in chosen:
                records[r.index].refused = f"out of memory in a batch of {len(chosen)}: {exc}"
            info.setdefault("errors", []).append(f"out of memory in a batch of {len(chosen)}")
            continue
        end = time.perf_counter() - start
        for r, row in zip(chosen, tokens, strict=True):
            rec = records[r.index]
            rec.first_token_s, rec.finish_s, rec.output_tokens = first, end, len(row)
            if tokenizer is not None:  # random weights (no tokenizer) answer nothing to check
                rec.found = r.answer in tokenizer.decode(row, skip_special_tokens=True)
            if progress:
                progress(1)
    clock.wall_s = time.perf_counter() - start
    return records, clock, info
