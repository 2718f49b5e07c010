"""The eager runs of one case (the full cache, a method, its physical limit) and the row fields they give."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvcake.bench.probes import PhaseMemory, memory_fields
from kvcake.bench.timing.loops import cache_of, cache_tokens, decode, median, prefill, random_ids
from kvcake.engines.transformers.report import Report
from kvcake.engines.transformers.session import compress
from kvcake.engines.transformers.storage import cache_kv_bytes
from kvcake.methods.base import Method

if TYPE_CHECKING:
    from kvcake.bench.timing.compiled import CompiledTiming


@dataclass
class Run:
    """One prefill followed by ``decode_tokens`` greedy steps, eager."""

    prefill_s: float
    steps: list[float]
    pre: PhaseMemory
    dec: PhaseMemory
    kv_prefill: int | None = None  # full cache: KV bytes after prefill
    kv_end: int | None = None  # full cache: KV bytes after decoding
    tokens: list[int] = field(default_factory=list)  # full cache: tokens per layer after prefill
    report_prefill: Report | None = None  # method: kvcake's report after prefill
    report_end: Report | None = None  # method: kvcake's report after decoding


def _probe(probe: PhaseMemory, measure: bool):
    return probe if measure else contextlib.nullcontext()


@torch.no_grad()
def run_full(model, ids: torch.Tensor, decode_tokens: int, device: torch.device, measure: bool) -> Run:
    """Prefill and decode with transformers' default cache (a DynamicCache); memory sampled when ``measure``."""
    pre, dec = PhaseMemory(device), PhaseMemory(device)
    with _probe(pre, measure):
        out, prefill_s = prefill(model, ids, device)
    cache = cache_of(out)
    kv_prefill, tokens = cache_kv_bytes(cache), cache_tokens(cache)
    with _probe(dec, measure):
        steps = decode(model, cache, out.logits, ids.shape[1], decode_tokens, device)
    run = Run(prefill_s, steps, pre, dec, kv_prefill=kv_prefill, kv_end=cache_kv_bytes(cache), tokens=tokens)
    del out, cache
    return run


@torch.no_grad()
def run_method(model, ids: torch.Tensor, method: Method, decode_tokens: int, device: torch.device,
               measure: bool) -> Run:
    """Prefill and decode under kvcake compression with ``method``; memory sampled when ``measure``."""
    pre, dec = PhaseMemory(device), PhaseMemory(device)
    with compress(model, method, max_new_tokens=decode_tokens) as press:
        with _probe(pre, measure):
            out, prefill_s = prefill(model, ids, device)
        cache = press.cache
        report_prefill = press.report
        steps: list[float] = []
        if decode_tokens:
            with _probe(dec, measure):
                steps = decode(model, cache, out.logits, ids.shape[1], decode_tokens, device)
        report_end = press.report
    del out, cache
    return Run(prefill_s, steps, pre, dec, report_prefill=report_prefill, report_end=report_end)


class Case:
    """The eager runs of one (length, method) while a length is measured (``method`` None: the full cache)."""

    def __init__(self, method: Method | None):
        self.method = method
        self.runs: list[Run] = []
        self.memory: Run | None = None
        self.one_shot: Run | None = None
        self.physical_ids: torch.Tensor | None = None
        self.physical_runs: list[Run] = []
        self.physical_notes: list[str] = []
        self.compile_mode: str | None = None  # compiled decoding (compile=True): the torch.compile mode
        self.compiled: CompiledTiming | None = None  # the case itself, compiled
        self.physical_compiled: CompiledTiming | None = None  # its physical limit in a compiled StaticCache
        self.compiled_notes: list[str] = []

    def plan_physical(self, report: Report, vocab: int, seed: int, device: torch.device) -> None:
        """The physical limit: a random prompt as long as the mean kept tokens per layer (rounded)."""
        kept = list(report.kept_after_prefill[0]) if report.kept_after_prefill else []
        if not kept:
            self.physical_notes.append("physical limit not measured: the method compressed no layer")
            return
        mean = sum(kept) / len(kept)
        tokens = max(1, round(mean))
        if tokens != mean:
            self.physical_notes.append(f"physical limit: mean kept tokens per layer {mean:.2f} rounded to {tokens}")
        if report.padding_bytes:
            self.physical_notes.append(
                "physical limit holds the real kept tokens; the compressed cache also stores head padding")
        self.physical_ids = random_ids(vocab, tokens, seed + 1_000_003 + tokens, device)

    @property
    def physical_tokens(self) -> int | None:
        """Tokens per layer of the physical limit's plain cache (None where it is not measured)."""
        return None if self.physical_ids is None else int(self.physical_ids.shape[1])

    def fields(self, length: int, notes: list[str]) -> dict[str, Any]:
        """The row fields of this case (``notes`` receives the case's notes)."""
        out = self._full_fields(length) if self.method is None else self._method_fields(length, self.method, notes)
        assert self.memory is not None
        out.update(memory_fields("prefill", [self.memory.pre]))
        out.update(memory_fields("decode", [self.memory.dec]))
        out.update(memory_fields("one_shot_prefill", [self.one_shot.pre] if self.one_shot else []))
        return out

    def _timing_fields(self) -> dict[str, Any]:
        steps = [s for r in self.runs for s in r.steps]
        prefill_runs = [r.prefill_s for r in self.runs]
        return dict(prefill_s=median(prefill_runs), prefill_s_runs=prefill_runs, decode_step_s=median(steps),
                    decode_steps_s=steps)

    def _full_fields(self, length: int) -> dict[str, Any]:
        last = self.runs[-1]
        assert last.kv_prefill is not None
        layers = len(last.tokens)
        return dict(
            method_label="full", layers=layers, bytes_per_token_layer=last.kv_prefill // max(1, length * layers),
            **self._timing_fields(), kept_per_layer=last.tokens, kept_mean=sum(last.tokens) / max(1, layers),
            kv_bytes_prefill=last.kv_prefill, kv_bytes_end=last.kv_end, kv_bytes_full_prefill=last.kv_prefill,
            kv_bytes_full_end=last.kv_end, metadata_bytes=0,
            # A DynamicCache only appends during prefill, so its peak is its size when prefill ends.
            peak_kv_bytes_prefill=last.kv_prefill,
        )

    def _method_fields(self, length: int, method: Method, notes: list[str]) -> dict[str, Any]:
        rp, re_ = self.runs[-1].report_prefill, self.runs[-1].report_end
        assert rp is not None and re_ is not None and self.one_shot is not None
        kept = list(rp.kept_after_prefill[0]) if rp.kept_after_prefill else []
        layers = len(rp.layers)
        out = dict(
            method_label=method.label, cascade=method.cascade, decode_eviction=method.decode_eviction,
            window=method.window, layers=layers, bytes_per_token_layer=rp.kv_bytes_full // max(1, length * layers),
            **self._timing_fields(), kept_per_layer=kept, kept_mean=sum(kept) / max(1, len(kept)),
            stored_per_layer=list(rp.layer_lengths), kept_end_per_layer=list(re_.kept_now[0]) if re_.kept_now else [],
            kv_bytes_prefill=rp.kv_bytes, kv_bytes_end=re_.kv_bytes, kv_bytes_full_prefill=rp.kv_bytes_full,
            kv_bytes_full_end=re_.kv_bytes_full, metadata_bytes=rp.metadata_bytes, padding_bytes=rp.padding_bytes,
            peak_kv_bytes_prefill=rp.peak_kv_bytes, peak_bound_bytes=rp.peak_bound_bytes if method.cascade else None,
        )
        if not method.cascade:
            notes.append("the method itself runs one-shot: peak_kv_bytes_prefill is the one-shot peak; no bound")
        one = self.one_shot.report_prefill
        assert one is not None
        out.update(peak_kv_bytes_one_shot=one.peak_kv_bytes, one_shot_prefill_s=self.one_shot.prefill_s,
                   one_shot_same_cache=list(one.kept_after_prefill[0]) == kept and one.kv_bytes == rp.kv_bytes)
        notes.extend(self.physical_notes)
        phys_steps = [s for r in self.physical_runs for s in r.steps]
        out.update(
            physical_limit_tokens=self.physical_tokens,
            physical_limit_kv_bytes=self.physical_runs[-1].kv_prefill if self.physical_runs else None,
            physical_limit_decode_step_s=median(phys_steps), physical_limit_decode_steps_s=phys_steps or None,
        )
        return out
