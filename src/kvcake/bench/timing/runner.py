"""The measuring schedule: every case of a prompt length, round after round, and :func:`run_bench`."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from kvcake.bench.row import BenchRow
from kvcake.bench.timing.cases import Case, run_full, run_method
from kvcake.bench.timing.compiled import attempt, compile_mode, compiled_fields, untimed_runs
from kvcake.bench.timing.compiled import compiled_method_case as method_case
from kvcake.bench.timing.compiled import compiled_static_case as static_case
from kvcake.bench.timing.loops import cache_of, decode, device_of, prefill, random_ids, vocab_size
from kvcake.methods.base import Method
from kvcake.methods.registry import build


class _Progress:
    """A tqdm bar over the runs of a benchmark, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="kvcake bench", unit="run")

    def running(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _method_names(methods: list[str]) -> list[str]:
    """``full`` first, then each method once, in the order given."""
    names = [m.lower() for m in methods]
    if "full" in names:
        names.remove("full")
    return ["full"] + list(dict.fromkeys(names))


def _check(lengths: list[int], budget: int | None, ratio: float | None, decode_tokens: int, repeats: int,
           warmup: int) -> None:
    if (budget is None) == (ratio is None):
        raise ValueError("give exactly one of budget (tokens per layer) or ratio (fraction of the prompt)")
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths!r}")
    if decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("decode_tokens and repeats must be >= 1 and warmup >= 0")


def _common_fields(model, model_name: str | None, **args: Any) -> dict[str, Any]:
    return dict(
        model=model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        device=str(device_of(model)), **args,
    )


@torch.no_grad()
def _warm_up(model, vocab: int, length: int, seed: int, device: torch.device) -> None:
    """One-time initialisation (kernels, thread pools) before anything is measured."""
    warm = random_ids(vocab, min(64, length), seed, device)
    out = prefill(model, warm, device)[0]
    decode(model, cache_of(out), out.logits, warm.shape[1], 1, device)


def schedule(warmup: int, repeats: int) -> list[str]:
    """The rounds at each length: warm-up, then one untimed round sampling memory (the last warm-up round, or an
    extra one when ``warmup`` is 0: the sampler thread never slows a timed run), then the timed rounds."""
    return ["warmup"] * max(0, warmup - 1) + ["memory"] + ["timed"] * repeats


class _Length:
    """The measurement of one prompt length: the eager rounds, then one one-shot prefill per method."""

    def __init__(self, model, length: int, built: dict[str, Method | None], decode_tokens: int, seed: int,
                 vocab: int, progress: _Progress):
        self.model, self.length, self.built, self.decode_tokens = model, length, built, decode_tokens
        self.seed, self.vocab, self.progress = seed, vocab, progress
        self.device = device_of(model)
        self.ids = random_ids(vocab, length, seed + length, self.device)
        self.cases = {name: Case(method) for name, method in built.items()}

    def round(self, number: int, total: int, kind: str) -> None:
        """One round: every case once (each method followed by its physical limit)."""
        for name, case in self.cases.items():
            self.progress.running(f"{self.length} tokens, round {number + 1}/{total} ({kind}), {name}")
            measure = kind == "memory"
            if case.method is None:
                run = run_full(self.model, self.ids, self.decode_tokens, self.device, measure)
            else:
                run = run_method(self.model, self.ids, case.method, self.decode_tokens, self.device, measure)
                if case.physical_ids is None and run.report_prefill is not None:
                    case.plan_physical(run.report_prefill, self.vocab, self.seed, self.device)
                if case.physical_ids is not None:  # the plain cache of the same size, right after
                    physical = run_full(self.model, case.physical_ids, self.decode_tokens, self.device, False)
                    if kind == "timed":
                        case.physical_runs.append(physical)
            if kind == "memory":
                case.memory = run
            elif kind == "timed":
                case.runs.append(run)
            self.progress.done()

    def one_shots(self) -> None:
        """Each method once more with one-shot allocation (``cascade=False``), timed and sampled at once."""
        for name, case in self.cases.items():
            if case.method is None:
                continue
            self.progress.running(f"{self.length} tokens, {name} one-shot")
            case.one_shot = run_method(self.model, self.ids, case.method.with_options(cascade=False), 0,
                                       self.device, True)
            self.progress.done()

    def compiled(self, warmup: int, repeats: int) -> None:
        """Each case once more with compiled decoding, one after another (each compiles afresh): the full cache and
        each method's physical limit in transformers' StaticCache, and the method itself."""
        mode = compile_mode(self.device)
        warm = untimed_runs(warmup, self.decode_tokens)
        timing: dict[str, Any] = dict(decode_tokens=self.decode_tokens, warm_runs=warm, timed_runs=repeats,
                                      device=self.device, mode=mode)
        for name, case in self.cases.items():
            self.progress.running(f"{self.length} tokens, {name} compiled")
            case.compile_mode = mode
            if case.method is None:
                case.compiled = attempt("compiled full cache (StaticCache)", case.compiled_notes,
                                        partial(static_case, self.model, self.ids, **timing))
            else:
                case.compiled = attempt(f"compiled {name}", case.compiled_notes,
                                        partial(method_case, self.model, self.ids, case.method, **timing))
            self.progress.done()
            if case.method is not None and case.physical_ids is not None:
                self.progress.running(f"{self.length} tokens, {name} physical limit compiled")
                case.physical_compiled = attempt("compiled physical limit (StaticCache)", case.compiled_notes,
                                                 partial(static_case, self.model, case.physical_ids, **timing))
                self.progress.done()

    def rows(self, common: dict[str, Any], compiled: bool) -> list[BenchRow]:
        """One eager row per case; with ``compiled``, then one compiled row per case."""
        rows = []
        for name, case in self.cases.items():
            notes: list[str] = []
            fields = case.fields(self.length, notes)
            if compiled:
                fields["compiled"] = False
            rows.append(BenchRow(**common, length=self.length, method=name, notes=notes, **fields))
        if compiled:
            for name, case in self.cases.items():
                notes = case.physical_notes + case.compiled_notes if case.method is not None else case.compiled_notes
                rows.append(BenchRow(**common, length=self.length, method=name, notes=list(notes),
                                     **compiled_fields(case)))
        return rows


def run_bench(model, lengths: list[int], methods: list[str], budget: int | None = None, ratio: float | None = None,
              decode_tokens: int = 16, repeats: int = 3, warmup: int = 1, progress: bool = True, *, seed: int = 0,
              method_options: dict[str, Any] | None = None, model_name: str | None = None,
              compile: bool = False) -> list[BenchRow]:
    """Measure prefill time, decode time per token and memory for every (prompt length, method).

    Parameters
    ----------
    model
        A causal LM (eval mode) on its device, e.g. from :func:`random_model` or :func:`load_model`.
    lengths
        Prompt lengths in tokens (random ids, fixed ``seed``; the same prompt for every method at a length).
    methods
        Method names (see ``kvcake methods``); ``full`` (no eviction) is always measured, first, as the reference.
    budget, ratio
        The methods' budget (tokens per layer, window included) or ratio of the prompt; exactly one.
    decode_tokens
        Greedy steps timed after each prefill (at least 1).
    repeats, warmup
        Measured runs (medians are reported) and discarded runs before them, per case. At each length the cases run
        round after round (full, then each method followed by its physical limit), so that a drifting load falls on
        all of them alike; process memory is sampled in an untimed round (the last warm-up round, or an extra one).
    method_options
        Extra method parameters passed to :func:`kvcake.methods.registry.build` (e.g. ``{"window": 32}``).
    compile
        Also time compiled decoding (see :mod:`kvcake.bench.timing.compiled`): after the eager rounds of a length,
        each case once more through ``torch.compile``, with the full cache and each physical limit in transformers'
        StaticCache; one more row per case, ``compiled=True`` (the eager rows get ``compiled=False``).

    Returns one :class:`BenchRow` per (length, method), in order; see ``benchmarks/README.md`` for every field.
    Figures that could not be measured are None, with the reason in the row's ``notes``.
    """
    _check(lengths, budget, ratio, decode_tokens, repeats, warmup)
    names = _method_names(methods)
    options = dict(method_options or {})
    built: dict[str, Method | None] = {name: build(name, budget=budget, ratio=ratio, **options) for name in names}
    built["full"] = None  # the full cache runs without kvcake
    device = device_of(model)
    vocab = vocab_size(model)
    common = _common_fields(model, model_name, budget=budget, ratio=ratio, decode_tokens=decode_tokens,
                            repeats=repeats, warmup=warmup, seed=seed)
    _warm_up(model, vocab, max(lengths), seed, device)
    rounds = schedule(warmup, repeats)
    compiled_runs = 2 * len(names) - 1 if compile else 0
    bar = _Progress(len(lengths) * (len(rounds) * len(names) + len(names) - 1 + compiled_runs), progress)
    rows: list[BenchRow] = []
    try:
        for length in [int(n) for n in lengths]:
            measuring = _Length(model, length, built, decode_tokens, seed, vocab, bar)
            for number, kind in enumerate(rounds):
                measuring.round(number, len(rounds), kind)
            measuring.one_shots()
            if compile:
                measuring.compiled(warmup, repeats)
            rows += measuring.rows(common, compile)
    finally:
        bar.close()
    return rows
