"""Speed and memory benchmark: what eviction costs and saves, per prompt length and method.

For every (prompt length, method) pair :func:`run_bench` measures, separately and with the same random prompt:

* prefill time, without compression (``full``) and with each method (median over ``repeats`` after ``warmup``);
* time per decoded token (median of per-step times of a hand-written greedy loop with true positions), for the full
  cache, for each method, and for the *physical limit*: a plain ``DynamicCache`` that holds exactly as many tokens per
  layer as the compressed cache does (prefilled from a random prompt of that length), i.e. what decoding would cost if
  eviction had no overhead at all;
* memory: KV bytes after prefill and after decoding, the peak KV bytes during prefill for the cascade and for
  one-shot allocation (the method run once more with ``cascade=False``), the SPEC bound on the cascade's peak, and
  the process memory of each phase (peak RSS sampled by a background thread on CPU; ``torch.cuda.max_memory_allocated``
  on GPU).

Nothing is estimated: a figure that cannot be measured is stored as None and a note in the row says why.
:func:`write_results` writes JSON, CSV, a markdown report and plots; :func:`summarise_targets` states the ratios the
project cares about from measured rows only. :func:`bench` does all of it for the command line.

Models are randomly initialised from named shapes (:data:`SHAPES`; speed does not depend on weight values) or loaded
from a local folder / the embedded default through :func:`kvcake.models.load`.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import inspect
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from kvcake.integration.cache import cache_kv_bytes
from kvcake.integration.session import cache_keyword, compress, output_cache
from kvcake.methods.registry import build

MIB = 2**20

#: Named model shapes for randomly initialised models. ``family`` picks the config class; the rest are its arguments.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        family="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        family="mistral", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=32768, rope_theta=1000000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=None,
    ),
    "llama-3.2-1b": dict(
        family="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
    "small": dict(
        family="llama", num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=1536, vocab_size=32000, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "tiny": dict(
        family="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=128, rope_theta=10000.0,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# -- models ------------------------------------------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """``dtype`` as a torch dtype; None means float32 on CPU and bfloat16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def shape_config(shape: str, max_positions: int | None = None):
    """The transformers config of a named shape (``max_positions`` raises max_position_embeddings if larger)."""
    from transformers import LlamaConfig, MistralConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    params = dict(SHAPES[shape])
    family = params.pop("family")
    theta = params.pop("rope_theta")
    if max_positions is not None:
        params["max_position_embeddings"] = max(params["max_position_embeddings"], int(max_positions))
    params["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[family]
    return cls(**params)


def parameter_count(config) -> int:
    """Parameters of a Llama/Mistral-style decoder with this config (for the memory check before building)."""
    h, inter, vocab, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if config.tie_word_embeddings else 2)
    return n * per_layer + embeddings + h


def _available_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 (no way to tell: skip the check)
        return None


def random_model(shape: str = "small", dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa",
                 device: torch.device | str = "cpu", *, max_positions: int | None = None, seed: int = 0):
    """A randomly initialised causal LM of a named shape (see :data:`SHAPES`), in eval mode, built on ``device``.

    Weights are drawn by transformers' own initialisation (normal, std 0.02; norms at 1) directly on the device, so
    activations stay finite; decoding speed does not depend on the values. Refuses, before allocating, a model whose
    weights would not fit in the device's free memory.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    config = shape_config(shape, max_positions)
    need = parameter_count(config) * torch.empty((), dtype=dtype).element_size()
    free = _available_bytes(device)
    if free is not None and need > free:
        raise MemoryError(
            f"shape {shape!r} needs {need / 2**30:.1f} GiB of weights in {dtype} but {device} has "
            f"{free / 2**30:.1f} GiB free; use a smaller shape, a 16-bit dtype or another device"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def load_model(name_or_path: str | None = "small", dtype: torch.dtype | str | None = None,
               attn_implementation: str = "sdpa", device: torch.device | str = "cpu", *,
               max_positions: int | None = None, seed: int = 0):
    """A named random shape (:data:`SHAPES`), a local model folder, or None for the embedded default model."""
    if name_or_path in SHAPES:
        return random_model(name_or_path, dtype, attn_implementation, device, max_positions=max_positions, seed=seed)
    from kvcake import models

    device = torch.device(device)
    model, _ = models.load(name_or_path, dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation)
    return model.to(device).eval()


# -- measuring ---------------------------------------------------------------------------------------------------------
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_backend(name: str | None):
    """A context restricting torch's scaled_dot_product_attention to one kernel: ``flash`` (FlashAttention-2, as
    built into PyTorch), ``efficient`` (memory-efficient), ``cudnn`` or ``math``; None leaves PyTorch's choice."""
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if name not in kernels:
        raise ValueError(f"unknown sdpa backend {name!r}; use one of {', '.join(SDPA_BACKENDS)}")
    return sdpa_kernel(kernels[name])


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_heap() -> None:
    """Return freed memory to the OS (glibc), so that the RSS at the start of a phase is what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_reader():
    """A function returning this process's resident set size in bytes, or None where none is available."""
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except ImportError:
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read
    return None


class PhaseMemory:
    """Process memory of one phase (a ``with`` block).

    On CPU: the resident set size is sampled every ``interval`` seconds by a background thread (torch kernels release
    the GIL, so sampling goes on during them); ``start`` is the RSS when the phase began (after ``gc`` and
    ``malloc_trim``), ``peak`` the highest sample. Short spikes between samples can be missed, and memory the
    allocator kept from earlier phases is reused without raising the RSS, so ``peak - start`` is a lower bound of
    what the phase allocated. On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
    (``start`` = memory allocated when the phase began), exact for tensors torch allocates.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self.start: int | None = None
        self.peak: int | None = None
        self.why_none: str | None = None
        self._read = None if device.type == "cuda" else _rss_reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int | None:
        return None if self.start is None or self.peak is None else self.peak - self.start

    def __enter__(self) -> PhaseMemory:
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        if self._read is None:
            self.why_none = "no RSS reader on this platform (install psutil)"
            return self
        self.start = self.peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value > self.peak:
                self.peak = value

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._read())


def _cache_tokens(cache) -> list[int]:
    return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def _output_cache(out):
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError("the model returned no cache; is use_cache supported?")
    return cache


def _prefill_kwargs(model) -> dict[str, Any]:
    # Only the last position's logits are needed (as in generate): the full logits would be S x vocab floats.
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _prefill(model, ids: torch.Tensor, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, **_prefill_kwargs(model))
    _sync(device)
    return out, time.perf_counter() - start


def _decode(model, cache, logits: torch.Tensor, start_pos: int, steps: int, device: torch.device) -> list[float]:
    """Greedy decoding by hand, one token per step at its true position; seconds of each step."""
    name = cache_keyword(model)
    token = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for i in range(steps):
        position = torch.tensor([[start_pos + i]], device=device)
        _sync(device)
        start = time.perf_counter()
        out = model(token, **{name: cache}, position_ids=position, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _random_ids(vocab: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=generator).to(device)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mem_fields(prefix: str, probes: list[PhaseMemory]) -> dict[str, Any]:
    """``<prefix>_rss_*`` / ``<prefix>_cuda_*`` from phase probes (the largest growth if several)."""
    measured = [p for p in probes if p.delta is not None]
    kind = "cuda" if probes and probes[0].kind == "cuda_allocated" else "rss"
    other = "rss" if kind == "cuda" else "cuda"
    if not measured:
        return {f"{prefix}_{kind}_peak_bytes": None, f"{prefix}_{kind}_delta_bytes": None,
                f"{prefix}_{other}_peak_bytes": None, f"{prefix}_{other}_delta_bytes": None}
    worst = max(measured, key=lambda p: p.delta)
    return {f"{prefix}_{kind}_peak_bytes": worst.peak, f"{prefix}_{kind}_delta_bytes": worst.delta,
            f"{prefix}_{other}_peak_bytes": None, f"{prefix}_{other}_delta_bytes": None}


@torch.no_grad()
def _run_full(model, ids, decode_tokens, device, measure: bool) -> dict[str, Any]:
    pre, dec = PhaseMemory(device), PhaseMemory(device)
    with pre if measure else _null():
        out, prefill_s = _prefill(model, ids, device)
    cache = _output_cache(out)
    kv_prefill, tokens = cache_kv_bytes(cache), _cache_tokens(cache)
    with dec if measure else _null():
        steps = _decode(model, cache, out.logits, ids.shape[1], decode_tokens, device)
    result = dict(prefill_s=prefill_s, steps=steps, kv_prefill=kv_prefill, kv_end=cache_kv_bytes(cache),
                  tokens=tokens, pre=pre, dec=dec)
    del out, cache
    return result


@torch.no_grad()
def _run_method(model, ids, method, decode_tokens, device, measure: bool) -> dict[str, Any]:
    pre, dec = PhaseMemory(device), PhaseMemory(device)
    with compress(model, method, max_new_tokens=decode_tokens) as press:
        with pre if measure else _null():
            out, prefill_s = _prefill(model, ids, device)
        cache = press.cache
        report_prefill = press.report
        steps = []
        if decode_tokens:
            with dec if measure else _null():
                steps = _decode(model, cache, out.logits, ids.shape[1], decode_tokens, device)
        report_end = press.report
    del out, cache
    return dict(prefill_s=prefill_s, steps=steps, report_prefill=report_prefill, report_end=report_end,
                pre=pre, dec=dec)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _vocab(model) -> int:
    from kvcake.integration.session import text_config

    return int(text_config(model).vocab_size)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="kvcake bench", unit="run")


def run_bench(model, lengths: list[int], methods: list[str], budget: int | None = None, ratio: float | None = None,
              decode_tokens: int = 16, repeats: int = 3, warmup: int = 1, progress: bool = True, *, seed: int = 0,
              method_options: dict[str, Any] | None = None, model_name: str | None = None) -> list[dict[str, Any]]:
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

    Returns one dict per (length, method), in order; see ``benchmarks/README.md`` for every field. Figures that could
    not be measured are None, with the reason in the row's ``notes``.
    """
    if (budget is None) == (ratio is None):
        raise ValueError("give exactly one of budget (tokens per layer) or ratio (fraction of the prompt)")
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths!r}")
    if decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("decode_tokens and repeats must be >= 1 and warmup >= 0")
    names = [m.lower() for m in methods]
    if "full" in names:
        names.remove("full")
    names = ["full"] + list(dict.fromkeys(names))
    options = dict(method_options or {})
    built = {name: build(name, budget=budget, ratio=ratio, **options) for name in names}  # fail early on bad input
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    vocab = _vocab(model)
    common = dict(
        model=model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        device=str(device), budget=budget, ratio=ratio, decode_tokens=decode_tokens, repeats=repeats, warmup=warmup,
        seed=seed,
    )
    with torch.no_grad():  # one-time initialisation (kernels, thread pools) before anything is measured
        warm = _random_ids(vocab, min(64, max(lengths)), seed, device)
        out = _prefill(model, warm, device)[0]
        _decode(model, _output_cache(out), out.logits, warm.shape[1], 1, device)
        del out
    # Every case of a length runs in each round, round after round, so that drifting load on a shared machine falls
    # on all of them alike. Rounds: warm-up, then one untimed round sampling memory (the last warm-up round, or an
    # extra one when warmup=0: the sampler thread never slows a timed run), then the timed rounds.
    schedule = ["warmup"] * max(0, warmup - 1) + ["memory"] + ["timed"] * repeats
    per_length = len(schedule) * len(names) + (len(names) - 1)
    bar = _progress(len(lengths) * per_length, progress)
    rows: list[dict[str, Any]] = []

    def running(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text, refresh=True)

    def done() -> None:
        if bar is not None:
            bar.update(1)

    try:
        for length in [int(n) for n in lengths]:
            ids = _random_ids(vocab, length, seed + length, device)
            cases = {name: _Case(built[name]) for name in names}
            for number, kind in enumerate(schedule):
                for name in names:
                    case = cases[name]
                    measure = kind == "memory"
                    running(f"{length} tokens, round {number + 1}/{len(schedule)} ({kind}), {name}")
                    if case.method is None:
                        run = _run_full(model, ids, decode_tokens, device, measure)
                    else:
                        run = _run_method(model, ids, case.method, decode_tokens, device, measure)
                        if case.physical_ids is None:
                            case.plan_physical(run["report_prefill"], vocab, seed, device)
                        if case.physical_ids is not None:  # the plain cache of the same size, right after
                            physical = _run_full(model, case.physical_ids, decode_tokens, device, False)
                            if kind == "timed":
                                case.physical_runs.append(physical)
                    if kind == "memory":
                        case.memory = run
                    elif kind == "timed":
                        case.runs.append(run)
                    done()
            for name in names[1:]:
                running(f"{length} tokens, {name} one-shot")
                cases[name].one_shot = _run_method(model, ids, built[name].with_options(cascade=False), 0, device,
                                                   True)
                done()
            for name in names:
                row: dict[str, Any] = dict(common, length=length, method=name, notes=[])
                row.update(cases[name].fields(length, row["notes"]))
                rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    return rows


class _Case:
    """The runs of one (length, method) while a length is measured."""

    def __init__(self, method):
        self.method = method
        self.runs: list[dict[str, Any]] = []
        self.memory: dict[str, Any] | None = None
        self.one_shot: dict[str, Any] | None = None
        self.physical_ids: torch.Tensor | None = None
        self.physical_runs: list[dict[str, Any]] = []
        self.physical_notes: list[str] = []

    def plan_physical(self, report, vocab: int, seed: int, device) -> None:
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
        self.physical_ids = _random_ids(vocab, tokens, seed + 1_000_003 + tokens, device)

    def fields(self, length: int, notes: list[str]) -> dict[str, Any]:
        runs = self.runs
        steps = [s for r in runs for s in r["steps"]]
        prefill = [r["prefill_s"] for r in runs]
        out: dict[str, Any]
        if self.method is None:
            last = runs[-1]
            layers = len(last["tokens"])
            out = dict(
                method_label="full", cascade=None, decode_eviction=None, window=None,
                layers=layers, bytes_per_token_layer=last["kv_prefill"] // max(1, length * layers),
                prefill_s=_median(prefill), prefill_s_runs=prefill, decode_step_s=_median(steps), decode_steps_s=steps,
                kept_per_layer=last["tokens"], kept_mean=sum(last["tokens"]) / max(1, layers),
                kv_bytes_prefill=last["kv_prefill"], kv_bytes_end=last["kv_end"],
                kv_bytes_full_prefill=last["kv_prefill"], kv_bytes_full_end=last["kv_end"], metadata_bytes=0,
                # A DynamicCache only appends during prefill, so its peak is its size when prefill ends.
                peak_kv_bytes_prefill=last["kv_prefill"], peak_kv_bytes_one_shot=None, peak_bound_bytes=None,
                one_shot_prefill_s=None, one_shot_same_cache=None,
                physical_limit_tokens=None, physical_limit_kv_bytes=None, physical_limit_decode_step_s=None,
                physical_limit_decode_steps_s=None,
            )
        else:
            method = self.method
            rp, re_ = runs[-1]["report_prefill"], runs[-1]["report_end"]
            kept = list(rp.kept_after_prefill[0]) if rp.kept_after_prefill else []
            layers = len(rp.layers)
            out = dict(
                method_label=method.label, cascade=method.cascade, decode_eviction=method.decode_eviction,
                window=method.window, layers=layers,
                bytes_per_token_layer=rp.kv_bytes_full // max(1, length * max(1, layers)),
                prefill_s=_median(prefill), prefill_s_runs=prefill, decode_step_s=_median(steps), decode_steps_s=steps,
                kept_per_layer=kept, kept_mean=sum(kept) / max(1, len(kept)),
                stored_per_layer=list(rp.layer_lengths),
                kept_end_per_layer=list(re_.kept_now[0]) if re_.kept_now else [],
                kv_bytes_prefill=rp.kv_bytes, kv_bytes_end=re_.kv_bytes,
                kv_bytes_full_prefill=rp.kv_bytes_full, kv_bytes_full_end=re_.kv_bytes_full,
                metadata_bytes=rp.metadata_bytes, padding_bytes=rp.padding_bytes,
                peak_kv_bytes_prefill=rp.peak_kv_bytes,
                peak_bound_bytes=rp.peak_bound_bytes if method.cascade else None,
            )
            if not method.cascade:
                notes.append("the method itself runs one-shot: peak_kv_bytes_prefill is the one-shot peak; no bound")
            one = self.one_shot["report_prefill"]
            out.update(peak_kv_bytes_one_shot=one.peak_kv_bytes, one_shot_prefill_s=self.one_shot["prefill_s"],
                       one_shot_same_cache=list(one.kept_after_prefill[0]) == kept and one.kv_bytes == rp.kv_bytes)
            notes.extend(self.physical_notes)
            phys_steps = [s for r in self.physical_runs for s in r["steps"]]
            out.update(
                physical_limit_tokens=None if self.physical_ids is None else int(self.physical_ids.shape[1]),
                physical_limit_kv_bytes=self.physical_runs[-1]["kv_prefill"] if self.physical_runs else None,
                physical_limit_decode_step_s=_median(phys_steps), physical_limit_decode_steps_s=phys_steps or None,
            )
        out.update(_mem_fields("prefill", [self.memory["pre"]]))
        out.update(_mem_fields("decode", [self.memory["dec"]]))
        out.update(_mem_fields("one_shot_prefill", [self.one_shot["pre"]] if self.one_shot else []))
        return out


# -- environment -------------------------------------------------------------------------------------------------------
def hardware() -> dict[str, Any]:
    """CPU model and cores, memory, GPU name, and library versions."""
    import transformers

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "cpu": platform.processor() or None, "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        info["memory_bytes"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    else:
        info["gpu"] = None
    from kvcake import __version__

    info["kvcake"] = __version__
    return info


# -- writing -----------------------------------------------------------------------------------------------------------
def _mib(value) -> str:
    return "—" if value is None else f"{value / MIB:.2f}"


def _ms(value) -> str:
    return "—" if value is None else f"{value * 1000:.2f}"


def _s(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _ratio(num, den) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def _grid(rows) -> tuple[list[int], list[str], dict[tuple[int, str], dict]]:
    lengths = sorted({r["length"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return lengths, methods, {(r["length"], r["method"]): r for r in rows}


def _full_of(index, length) -> dict | None:
    return index.get((length, "full"))


#: Tables of results.md: (title, value of a row, formatter, methods it applies to: "all" or "compressed").
def _metric_tables():
    return [
        ("Prefill time (s, median)", lambda r, f: r.get("prefill_s"), _s, "all"),
        ("Prefill time, one-shot allocation (s, one run)", lambda r, f: r.get("one_shot_prefill_s"), _s, "compressed"),
        ("Decode time per token (ms, median of steps)", lambda r, f: r.get("decode_step_s"), _ms, "all"),
        ("Decode time per token, physical limit: plain cache of the kept size (ms)",
         lambda r, f: r.get("physical_limit_decode_step_s"), _ms, "compressed"),
        ("Tokens kept per layer after prefill (mean)", lambda r, f: r.get("kept_mean"),
         lambda v: "—" if v is None else f"{v:.1f}", "all"),
        ("KV cache after prefill (MiB)", lambda r, f: r.get("kv_bytes_prefill"), _mib, "all"),
        ("KV cache after decoding (MiB)", lambda r, f: r.get("kv_bytes_end"), _mib, "all"),
        ("Peak KV during prefill, as run: cascade for methods (MiB)", lambda r, f: r.get("peak_kv_bytes_prefill"),
         _mib, "all"),
        ("Peak KV during prefill, one-shot allocation (MiB)", lambda r, f: r.get("peak_kv_bytes_one_shot"), _mib,
         "compressed"),
        ("SPEC bound on the cascade's peak (MiB)", lambda r, f: r.get("peak_bound_bytes"), _mib, "compressed"),
        ("Process RSS growth during prefill (MiB, CPU)", lambda r, f: r.get("prefill_rss_delta_bytes"), _mib, "all"),
        ("Process RSS growth during one-shot prefill (MiB, CPU)",
         lambda r, f: r.get("one_shot_prefill_rss_delta_bytes"), _mib, "compressed"),
        ("Process RSS growth during decoding (MiB, CPU)", lambda r, f: r.get("decode_rss_delta_bytes"), _mib, "all"),
        ("CUDA peak allocated during prefill (MiB)", lambda r, f: r.get("prefill_cuda_peak_bytes"), _mib, "all"),
        ("CUDA peak allocated during one-shot prefill (MiB)", lambda r, f: r.get("one_shot_prefill_cuda_peak_bytes"),
         _mib, "compressed"),
        ("CUDA peak allocated during decoding (MiB)", lambda r, f: r.get("decode_cuda_peak_bytes"), _mib, "all"),
        ("Prefill time relative to full (method / full)",
         lambda r, f: _ratio(r.get("prefill_s"), f and f.get("prefill_s")), _x, "compressed"),
        ("Decode speedup vs full (full / method, per token)",
         lambda r, f: _ratio(f and f.get("decode_step_s"), r.get("decode_step_s")), _x, "compressed"),
        ("Decode time relative to the physical limit (method / plain cache of the kept size)",
         lambda r, f: _ratio(r.get("decode_step_s"), r.get("physical_limit_decode_step_s")), _x, "compressed"),
    ]


def markdown_report(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """results.md: one table per metric (rows = prompt length, columns = method), ratios, targets and notes."""
    lengths, methods, index = _grid(rows)
    meta = meta or {}
    lines = ["# kvcake benchmark", ""]
    hw = meta.get("hardware", {})
    if hw:
        lines.append(f"- hardware: {hw.get('gpu') or hw.get('cpu')} ({hw.get('cpu_cores')} CPU cores, "
                     f"{hw.get('torch_threads')} torch threads); torch {hw.get('torch')}, "
                     f"transformers {hw.get('transformers')}")
    if rows:
        r0 = rows[0]
        kernel = f" (sdpa kernel: {r0['sdpa_backend']})" if r0.get("sdpa_backend") else ""
        lines.append(f"- model: {r0.get('model')}; dtype {r0.get('dtype')}; attention {r0.get('attn_implementation')}"
                     f"{kernel}; device {r0.get('device')}")
        lines.append(f"- budget {r0.get('budget')} tokens per layer" if r0.get("budget") is not None
                     else f"- ratio {r0.get('ratio')} of the prompt")
        lines.append(f"- {r0.get('decode_tokens')} decoded tokens, {r0.get('repeats')} measured runs after "
                     f"{r0.get('warmup')} warm-up runs per case")
    lines.append("")
    for title, value, fmt, which in _metric_tables():
        cols = [m for m in methods if which == "all" or m != "full"]
        cells = {(n, m): value(index[(n, m)], _full_of(index, n)) for n in lengths for m in cols if (n, m) in index}
        if not cols or all(v is None for v in cells.values()):
            continue
        lines += [f"## {title}", "", "| prompt tokens | " + " | ".join(cols) + " |",
                  "|---:|" + "---:|" * len(cols)]
        for n in lengths:
            lines.append(f"| {n} | " + " | ".join(fmt(cells.get((n, m))) for m in cols) + " |")
        lines.append("")
    lines += ["## What the measurements say", ""] + [f"- {s}" for s in summarise_targets(rows)] + [""]
    notes = [(r["length"], r["method"], note) for r in rows for note in r.get("notes", [])]
    lines += ["## What is measured, and why some cells are empty", ""] + [f"- {n}" for n in measurement_notes(rows)]
    lines += [f"- {n} tokens, {m}: {note}" for n, m, note in notes] + [""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    from kvcake.plots import pyplot, save

    plt = pyplot()

    lengths, methods, index = _grid(rows)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    written = []

    def series(method, key, scale=1.0):
        xs, ys = [], []
        for n in lengths:
            value = index.get((n, method), {}).get(key)
            if value is not None:
                xs.append(n)
                ys.append(value * scale)
        return xs, ys

    def finish(fig, ax, name, ylabel, title):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out_dir / name, dpi=120))

    # decode latency per token; one dashed line per distinct physical limit (methods keeping the same sizes share it)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    limits: dict[tuple, list[str]] = {}
    for m in methods:
        xs, ys = series(m, "decode_step_s", 1000)
        if xs:
            ax.plot(xs, ys, marker="o", color=colors[m], label=m)
        xs, ys = series(m, "physical_limit_decode_step_s", 1000)
        if xs:
            tokens = tuple(index[(n, m)].get("physical_limit_tokens") for n in xs)
            limits.setdefault((tuple(xs), tuple(ys), tokens), []).append(m)
    for (xs, ys, tokens), owners in limits.items():
        size = f"{tokens[0]} tokens per layer" if len(set(tokens)) == 1 else "the kept size"
        color = colors[owners[0]] if len(owners) == 1 else "black"
        ax.plot(xs, ys, linestyle="--", marker="x", color=color,
                label=f"physical limit: plain cache of {size} ({', '.join(owners)})")
    finish(fig, ax, "decode_latency.png", "ms per decoded token", "Decode latency per token")

    # KV memory: after prefill, and peak during prefill (cascade vs one-shot)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in methods:
        xs, ys = series(m, "kv_bytes_prefill", 1 / MIB)
        if xs:
            left.plot(xs, ys, marker="o", color=colors[m], label=m)
        xs, ys = series(m, "peak_kv_bytes_prefill", 1 / MIB)
        if xs:
            right.plot(xs, ys, marker="o", color=colors[m], label=f"{m}" if m == "full" else f"{m} cascade")
        xs, ys = series(m, "peak_kv_bytes_one_shot", 1 / MIB)
        if xs:
            right.plot(xs, ys, linestyle="--", marker="s", color=colors[m], label=f"{m} one-shot")
        xs, ys = series(m, "peak_bound_bytes", 1 / MIB)
        if xs:
            right.plot(xs, ys, linestyle=":", color=colors[m], label=f"{m} SPEC bound")
    for ax, title in ((left, "KV cache after prefill"), (right, "Peak KV during prefill")):
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(save(fig, out_dir / "kv_memory.png", dpi=120))

    # prefill time
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in methods:
        xs, ys = series(m, "prefill_s")
        if xs:
            ax.plot(xs, ys, marker="o", color=colors[m], label=m if m == "full" else f"{m} (cascade)")
        xs, ys = series(m, "one_shot_prefill_s")
        if xs:
            ax.plot(xs, ys, linestyle="--", marker="s", color=colors[m], label=f"{m} one-shot")
    ax.set_yscale("log")
    finish(fig, ax, "prefill_time.png", "seconds", "Prefill time")
    return written


def _csv_value(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def write_results(rows: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any] | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """Write results.json (environment, arguments, rows, summary), results.csv, results.md and PNG plots.

    ``meta`` is stored in results.json as given (the CLI puts its exact arguments there under ``args``); the hardware
    and library versions of this process are added under ``hardware``. Returns the paths written by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("hardware", hardware())
    meta.setdefault("notes", measurement_notes(rows))
    if rows and "run" not in meta:
        keys = ("model", "dtype", "attn_implementation", "sdpa_backend", "device", "budget", "ratio", "decode_tokens",
                "repeats", "warmup", "seed")
        meta["run"] = {k: rows[0].get(k) for k in keys}
        meta["run"]["lengths"] = sorted({r["length"] for r in rows})
        meta["run"]["methods"] = list(dict.fromkeys(r["method"] for r in rows))
    summary = summarise_targets(rows)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2, default=str))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in columns})
    paths["md"].write_text(markdown_report(rows, meta))
    if plots and rows:
        for p in _plot(rows, out):
            paths[p.stem] = p
    return paths


def measurement_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Why whole columns are None, and what the memory columns measure (written to results.json and results.md)."""
    notes = [
        "times: time.perf_counter around each prefill call and each decoding step (forward + greedy argmax), with "
        "torch.cuda.synchronize before and after on CUDA; prefill = median of the measured runs, decode = median of "
        "all steps of all measured runs; the one-shot prefill is a single run; at each length the cases run round "
        "after round (full, each method followed by its physical limit) so that a drifting load falls on all alike",
        "process memory is measured in an untimed round (the last warm-up round, or one extra round when there is "
        "no warm-up), so that sampling never slows a timed run; the one-shot run is timed and sampled at "
        "once (its sampler can add about a millisecond per forward on CPU)",
        "KV bytes: key and value tensors held (kvcake's report for methods, summed cache tensors for full); kvcake's "
        "own position bookkeeping is metadata_bytes, not included",
        "full rows have no one-shot peak, SPEC bound or physical limit (nothing is evicted: the full cache is its own "
        "physical limit); their prefill peak is the cache size after prefill, since a DynamicCache only grows",
    ]
    devices = {r.get("device", "") for r in rows}
    if any(not d.startswith("cuda") for d in devices):
        notes.append("CPU rows: *_cuda_* columns are None (no GPU used); *_rss_peak_bytes is the highest resident set "
                     "size sampled every 2 ms by a background thread during the phase, *_rss_delta_bytes that peak "
                     "minus the RSS at the start of the phase (after gc and malloc_trim); the delta is a lower bound "
                     "of what the phase allocated (memory the allocator kept from earlier phases is reused without "
                     "raising RSS, spikes shorter than 2 ms can be missed)")
    if any(d.startswith("cuda") for d in devices):
        notes.append("CUDA rows: *_rss_* columns are None (host RSS says nothing about GPU memory); "
                     "*_cuda_peak_bytes is torch.cuda.max_memory_allocated after reset_peak_memory_stats at the start "
                     "of the phase, *_cuda_delta_bytes that peak minus memory_allocated at the start (weights "
                     "excluded)")
    return notes


# -- summary -----------------------------------------------------------------------------------------------------------
def summarise_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The ratios the project cares about, stated from measured rows only (nothing is asserted or estimated).

    Prefill overhead of each method vs full at each length; decode step time vs the physical-limit plain cache;
    decode speedup vs full at the longest length; the cascade's peak vs the SPEC bound (in tokens of one layer, and
    in windows); one-shot peak vs the full cache.
    """
    lengths, methods, index = _grid(rows)
    compressed = [m for m in methods if m != "full"]
    lines: list[str] = []
    if not rows:
        return ["no rows measured"]

    def missing(what, n, m):
        lines.append(f"{m} at {n} tokens: {what} not measured")

    def measured():
        """(length, method, row) for every compressed case that was measured, lengths first."""
        for n in lengths:
            for m in compressed:
                if (r := index.get((n, m))) is not None:
                    yield n, m, r

    for n, m, r in measured():
        full = _full_of(index, n)
        ratio = _ratio(r.get("prefill_s"), full and full.get("prefill_s"))
        if ratio is None:
            missing("prefill overhead vs full", n, m)
        else:
            lines.append(f"prefill overhead, {m} at {n} tokens: {ratio:.3f}× full "
                         f"({r['prefill_s']:.3f} s vs {full['prefill_s']:.3f} s, {100 * (ratio - 1):+.1f}%)")
    for n, m, r in measured():
        ratio = _ratio(r.get("decode_step_s"), r.get("physical_limit_decode_step_s"))
        if ratio is None:
            missing("decode time vs the physical limit", n, m)
        else:
            lines.append(f"decode step vs physical limit, {m} at {n} tokens: {ratio:.3f}× a plain cache of "
                         f"{r['physical_limit_tokens']} tokens per layer ({1000 * r['decode_step_s']:.2f} ms vs "
                         f"{1000 * r['physical_limit_decode_step_s']:.2f} ms)")
    longest = lengths[-1]
    full = _full_of(index, longest)
    for m in compressed:
        r = index.get((longest, m))
        if r is None:
            continue
        speedup = _ratio(full and full.get("decode_step_s"), r.get("decode_step_s"))
        if speedup is None:
            missing("decode speedup vs full", longest, m)
        else:
            lines.append(f"decode speedup vs full at the longest prompt ({longest} tokens), {m}: {speedup:.2f}× "
                         f"({1000 * full['decode_step_s']:.2f} ms → {1000 * r['decode_step_s']:.2f} ms per token)")
    for n, m, r in measured():
        peak, bound, per_token = r.get("peak_kv_bytes_prefill"), r.get("peak_bound_bytes"), r.get(
            "bytes_per_token_layer")
        if peak is None or bound is None or not per_token:
            missing("cascade peak vs SPEC bound", n, m)
        else:
            gap = (bound - peak) / per_token
            window = r.get("window") or 0
            windows = f" = {gap / window:.2f} windows of {window}" if window else ""
            lines.append(f"cascade peak vs SPEC bound, {m} at {n} tokens: peak {peak / MIB:.2f} MiB, bound "
                         f"{bound / MIB:.2f} MiB; the peak is {gap:.1f} tokens of one layer "
                         f"{'below' if gap >= 0 else 'ABOVE'} the bound{windows}")
        one_shot, full_kv = r.get("peak_kv_bytes_one_shot"), r.get("kv_bytes_full_prefill")
        ratio = _ratio(one_shot, full_kv)
        if ratio is None:
            missing("one-shot peak vs full", n, m)
        else:
            cascade = _ratio(peak, full_kv)
            extra = f"; the cascade's peak is {cascade:.3f}× full" if cascade is not None else ""
            lines.append(f"one-shot peak vs full cache, {m} at {n} tokens: {ratio:.3f}× "
                         f"({one_shot / MIB:.2f} MiB vs {full_kv / MIB:.2f} MiB){extra}")
    return lines


# -- all in one (the command line) ------------------------------------------------------------------------------------
def bench(model: str | None = "small", lengths: list[int] = (2048, 8192),
          methods: list[str] = ("full", "cake", "snapkv"),
          budget: int | None = 1024, ratio: float | None = None, decode_tokens: int = 16, repeats: int = 3,
          warmup: int = 1, dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa",
          device: str | None = None, out_dir: str | Path | None = "bench-results", progress: bool = True,
          seed: int = 0, method_options: dict[str, Any] | None = None,
          threads: int | None = None, sdpa: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Load (or build) the model, run :func:`run_bench`, write the results to ``out_dir`` (None: do not write).

    ``model``: a shape name from :data:`SHAPES` (random weights), a local model folder, or None for the embedded
    default. ``device`` None: CUDA when available, else CPU. ``threads``: torch CPU threads (None: leave as is; on a
    CPU shared with other jobs, 1 thread avoids OpenMP barriers waiting on a descheduled thread). ``sdpa``: restrict
    the sdpa backend to one kernel (see :func:`sdpa_backend`; e.g. ``flash``). Returns the rows and the paths written.
    """
    args = dict(model=model, lengths=list(lengths), methods=list(methods), budget=budget, ratio=ratio,
                decode_tokens=decode_tokens, repeats=repeats, warmup=warmup,
                dtype=None if dtype is None else str(dtype), attn_implementation=attn_implementation, device=device,
                out_dir=None if out_dir is None else str(out_dir), seed=seed, method_options=method_options,
                threads=threads, sdpa=sdpa)
    context = sdpa_backend(sdpa)  # checks the name before the model loads
    if threads is not None:
        torch.set_num_threads(int(threads))
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(model, dtype, attn_implementation, device, max_positions=max(lengths) + decode_tokens + 1,
                    seed=seed)
    name = model if model is not None else "embedded default"
    with context:
        rows = run_bench(lm, list(lengths), list(methods), budget=budget, ratio=ratio, decode_tokens=decode_tokens,
                         repeats=repeats, warmup=warmup, progress=progress, seed=seed, method_options=method_options,
                         model_name=name)
    for row in rows:
        row["sdpa_backend"] = sdpa
    meta = {"args": args, "load_average_at_start": load_before}
    paths = {} if out_dir is None else write_results(rows, out_dir, meta=meta)
    return rows, paths


__all__ = [
    "SHAPES", "PhaseMemory", "bench", "cache_kv_bytes", "hardware", "load_model", "markdown_report",
    "measurement_notes", "random_model",
    "resolve_dtype", "run_bench", "sdpa_backend", "shape_config", "summarise_targets", "write_results",
]
