"""Compiled decoding: honest references in transformers' StaticCache, and the compiled case of a kvcake method.

With ``compile=True`` the benchmark times, beside the eager cases, decoding through
``torch.compile(model.forward, fullgraph=True, mode=...)`` (mode ``default`` on CPU, ``reduce-overhead`` — CUDA
graphs — on CUDA) with the same hand-written greedy loop at true positions:

* the full cache in transformers' own :class:`~transformers.StaticCache`, sized prompt + decoding steps and prefilled
  eagerly: what a compiled full-cache decoder costs;
* the *physical limit*: a StaticCache holding as many tokens per layer as the compressed cache (a random prompt of
  that length, room for the decoded tokens), compiled the same way;
* the method itself, through :func:`compiled_method_case`.

Each compiled case starts from ``torch._dynamo.reset()`` and is counted with torch's own counters
(:class:`DynamoCounts`): graph breaks from the first compiled step to the last timed one, and the graphs dynamo
produced during the timed steps (each one a recompilation). The first compiled step — the compilation — is reported
as ``compile_s`` and never enters the per-step medians.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcake.bench.timing.cases import Case
from kvcake.bench.timing.loops import greedy_steps, median, prefill
from kvcake.methods.base import Method

#: One prefill then the greedy steps of one run: (seconds of each step, greedy tokens).
RunOnce = Callable[[], tuple[list[float], list[int]]]

#: Untimed compiled steps before timing: CUDA graph trees run eagerly on the first call and record on the second.
MIN_UNTIMED_STEPS = 3


def compile_mode(device: torch.device) -> str:
    """The torch.compile mode of compiled decoding: ``reduce-overhead`` (CUDA graphs) on CUDA, else ``default``."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def untimed_runs(warmup: int, decode_tokens: int) -> int:
    """Untimed compiled runs of a case: ``warmup``, at least one (it compiles), and at least MIN_UNTIMED_STEPS steps."""
    return max(1, warmup, -(-MIN_UNTIMED_STEPS // decode_tokens))


@dataclass
class DynamoCounts:
    """A reading of torch's compile counters (``torch._dynamo.utils``): compare two readings with :meth:`since`."""

    graph_breaks: int  # counters["graph_break"], summed over reasons
    graphs: int  # counters["stats"]["unique_graphs"]: graphs dynamo produced
    cudagraph_skips: int  # counters["inductor"]["cudagraph_skips"]: compiled graphs run without CUDA graphs
    guard_failures: list[str]  # guard_failures: why a cached graph was rejected (one reason per recompilation)

    @classmethod
    def read(cls) -> DynamoCounts:
        from torch._dynamo.utils import counters, guard_failures

        return cls(graph_breaks=int(sum(counters["graph_break"].values())),
                   graphs=int(counters["stats"]["unique_graphs"]),
                   cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]),
                   guard_failures=[str(r) for reasons in guard_failures.values() for r in reasons])

    def since(self, earlier: DynamoCounts) -> DynamoCounts:
        """What happened between ``earlier`` and this reading."""
        return DynamoCounts(self.graph_breaks - earlier.graph_breaks, self.graphs - earlier.graphs,
                            self.cudagraph_skips - earlier.cudagraph_skips,
                            self.guard_failures[len(earlier.guard_failures):])


@dataclass
class CompiledTiming:
    """The compiled decoding of one case."""

    steps: list[float]  # seconds of every timed compiled step
    compile_s: float | None  # seconds of the first compiled step (the compilation)
    graph_breaks: int  # from the first compiled step to the last timed one
    recompiles: int  # graphs dynamo produced during the timed steps
    tokens: list[int]  # greedy tokens of the last timed run
    mode: str  # the torch.compile mode
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float | None:
        """Median seconds per timed step."""
        return median(self.steps)


def time_compiled(once: RunOnce, warm_runs: int, timed_runs: int, mode: str, what: str) -> CompiledTiming:
    """Run ``once`` ``warm_runs`` times untimed (the first step of the first run compiles), then ``timed_runs``
    times timed, counting graph breaks and recompilations; dynamo is reset before and after."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        start = DynamoCounts.read()
        compile_s = None
        for number in range(warm_runs):
            times, _ = once()
            if number == 0 and times:
                compile_s = times[0]
        before = DynamoCounts.read()
        steps: list[float] = []
        tokens: list[int] = []
        for _ in range(timed_runs):
            times, tokens = once()
            steps += times
        after = DynamoCounts.read()
    finally:
        torch._dynamo.reset()
    timed, whole = after.since(before), after.since(start)
    notes = [f"{what}: recompiled during the timed steps ({reason.splitlines()[0].strip()})"
             for reason in timed.guard_failures[:1]]
    if whole.cudagraph_skips:
        notes.append(f"{what}: CUDA graphs skipped {whole.cudagraph_skips} times (counters inductor/cudagraph_skips)")
    return CompiledTiming(steps=steps, compile_s=compile_s, graph_breaks=whole.graph_breaks,
                          recompiles=timed.graphs, tokens=tokens, mode=mode, notes=notes)


def _step_marker(device: torch.device, mode: str) -> Callable[[], None] | None:
    """CUDA graphs: each decoding step is a new iteration (the previous step's outputs may be overwritten)."""
    if device.type == "cuda" and mode == "reduce-overhead":
        return torch.compiler.cudagraph_mark_step_begin
    return None


@torch.no_grad()
def compiled_static_case(model, ids: torch.Tensor, decode_tokens: int, warm_runs: int, timed_runs: int,
                         device: torch.device, mode: str | None = None) -> CompiledTiming:
    """Greedy decoding of ``ids`` through a compiled forward, the tokens in transformers' StaticCache.

    The cache is sized ``len(ids) + decode_tokens`` slots per layer and allocated once (its tensors keep their
    addresses, as compiled graphs and CUDA graphs need); each run resets it, prefills it eagerly and decodes
    ``decode_tokens`` steps through ``torch.compile(model.forward, fullgraph=True, mode=mode)``.
    """
    from transformers import StaticCache

    mode = mode or compile_mode(device)
    length = int(ids.shape[1])
    cache = StaticCache(config=model.config, max_cache_len=length + decode_tokens)
    forward = torch.compile(model.forward, fullgraph=True, mode=mode)
    marker = _step_marker(device, mode)

    def once() -> tuple[list[float], list[int]]:
        cache.reset()
        out, _ = prefill(model, ids, device, cache=cache)
        return greedy_steps(model, cache, out.logits, length, decode_tokens, device, forward=forward,
                            before_step=marker)

    return time_compiled(once, warm_runs, timed_runs, mode, f"StaticCache of {length + decode_tokens} slots")


@torch.no_grad()
def compiled_method_case(model, ids: torch.Tensor, method: Method, decode_tokens: int, warm_runs: int,
                         timed_runs: int, device: torch.device, mode: str | None = None) -> CompiledTiming:
    """Greedy decoding of ``ids`` compressed by ``method``, the decoding steps compiled (as
    :func:`compiled_static_case`, with :func:`time_compiled` counting the steps).

    One compressed cache serves every run: it is reset, prefilled eagerly (cascade included) and frozen into its
    fixed-shape decoding buffers, which are reused at the same addresses from run to run.
    """
    from kvcake.engines.transformers.session import compress

    mode = mode or compile_mode(device)
    length = int(ids.shape[1])
    with compress(model, method, compile=True, compile_mode=mode, max_new_tokens=decode_tokens) as press:
        cache = press.new_cache()
        marker = _step_marker(device, mode)

        def once() -> tuple[list[float], list[int]]:
            cache.reset()
            out, _ = prefill(model, ids, device, cache=cache)
            return greedy_steps(model, cache, out.logits, length, decode_tokens, device, forward=press.forward,
                                before_step=marker)

        return time_compiled(once, warm_runs, timed_runs, mode, f"{method.label} compiled")


def attempt(what: str, notes: list[str], measure: Callable[[], CompiledTiming]) -> CompiledTiming | None:
    """``measure()``, or None with the reason in ``notes`` when it cannot run (nothing is estimated)."""
    try:
        timing = measure()
    except NotImplementedError as exc:
        notes.append(f"{what} not measured: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 (a failed compilation is reported, the other cases still run)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        notes.append(f"{what} not measured: {type(exc).__name__}: {first}")
        return None
    notes.extend(timing.notes)
    return timing


def compiled_fields(case: Case) -> dict[str, Any]:
    """The fields of a case's compiled row (``compiled=True``), from its compiled timings."""
    own, physical = case.compiled, case.physical_compiled
    out: dict[str, Any] = dict(compiled=True, compile_mode=case.compile_mode)
    if own is not None:
        out.update(decode_step_s=own.step_s, decode_steps_s=own.steps, compile_s=own.compile_s,
                   graph_breaks=own.graph_breaks, recompiles=own.recompiles)
    method = case.method
    if method is None:
        out.update(method_label="full")
        return out
    out.update(method_label=method.label, cascade=method.cascade, decode_eviction=method.decode_eviction,
               window=method.window, physical_limit_tokens=case.physical_tokens)
    if physical is not None:
        out.update(physical_limit_decode_step_s=physical.step_s, physical_limit_decode_steps_s=physical.steps,
                   physical_limit_compile_s=physical.compile_s, physical_limit_graph_breaks=physical.graph_breaks,
                   physical_limit_recompiles=physical.recompiles)
    return out
