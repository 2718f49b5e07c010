"""Attaching a method to a model for the duration of a ``with`` block.

>>> with kvcake.compress(model, kvcake.CAKE(budget=256)) as press:
...     out = model.generate(**inputs, max_new_tokens=32)
>>> press.report.kept_after_prefill

While the block is active, the model's attention modules dispatch to the kvcake wrapper of their own backend, and a
forward pre-hook on the model gives every forward that starts a new sequence a fresh :class:`KVCakeCache` (the one
``generate`` creates is swapped for it) and hands the request's cache to the attention calls. On exit the backend
name and the hook are restored, so requests never leak into one another and nothing stays on the model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvcake.engines.transformers import attention, drafts, turns
from kvcake.engines.transformers.cache import KVCakeCache, UnsupportedCacheError
from kvcake.engines.transformers.compat import cache_argument, cache_keyword, output_cache, text_config
from kvcake.engines.transformers.report import Report
from kvcake.engines.transformers.state import CompiledShape, Settings

SUPPORTED_BACKENDS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
#: torch.compile modes for compiled decoding; None picks "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class UnsupportedModelError(TypeError):
    """The model has no attention layers kvcake knows how to compress."""


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules of a decoder: they carry ``layer_idx`` and query/output projections."""
    found = []
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int) or not hasattr(module, "config"):
            continue
        if hasattr(module, "o_proj") and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")):
            found.append(module)
    return found


class Compression:
    """A method attached to a model; use as a context manager (see :func:`kvcake.compress`)."""

    def __init__(self, model: torch.nn.Module, method: Any, *, max_new_tokens: int | None = None,
                 compile: bool = False, compile_mode: str | None = None, uncompressed_tail: int = 0) -> None:
        from kvcake.methods.base import Method

        if not isinstance(method, Method):
            hint = " (a class: build one, e.g. kvcake.CAKE(budget=128))" if isinstance(method, type) else ""
            raise TypeError(f"compress needs a kvcake method such as kvcake.CAKE(budget=128), got {method!r}{hint}; "
                            "for the full cache, run the model outside a compress block")
        if not isinstance(uncompressed_tail, int) or uncompressed_tail < 0:
            raise ValueError(f"uncompressed_tail must be a non-negative integer, got {uncompressed_tail!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}; use one of {', '.join(COMPILE_MODES)}")
        self.model = model
        self.method = method
        self.max_new_tokens = max_new_tokens
        self.compile = compile
        self.compile_mode = compile_mode
        self.uncompressed_tail = uncompressed_tail
        self._compiled: Any = None
        self._compiled_shape = CompiledShape()  # what the compiled step was traced for, shared by the block's caches
        self._call_tokens: int | None = None  # max_new_tokens of the generate call in progress
        self._draft_prompt: int | None = None  # prompt length of an assisted generate call in progress
        self._draft_logits: torch.Tensor | None = None  # the prompt's last logits, for the forward that drafts on it
        self.active_cache: KVCakeCache | None = None
        self.last_cache: KVCakeCache | None = None
        self._report: Report | None = None
        self._report_error: Exception | None = None  # why the last request's report could not be made
        self._saved: list[tuple[Any, str]] = []
        self._hook: Any = None
        self._after_hook: Any = None
        self._feeding: KVCakeCache | None = None  # the cache of the forward running now
        self._cache_name: str | None = None

    # -- attach / detach ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Compression:
        modules = attention_modules(self.model)
        if not modules:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: no standard attention layers found (kvcake needs decoder attention "
                "modules with a layer_idx and q/o projections, as in Llama, Mistral, Qwen, Gemma and Phi-3 models)"
            )
        configs: list[Any] = list({id(m.config): m.config for m in modules}.values())
        if any(attention.base_name(c._attn_implementation) for c in configs):
            raise RuntimeError("a kvcake compression is already active on this model; nest none")
        for config in configs:
            base = config._attn_implementation or "eager"
            if base not in SUPPORTED_BACKENDS:
                raise ValueError(
                    f"attention backend {base!r} is not supported by kvcake; use one of {', '.join(SUPPORTED_BACKENDS)}"
                )
        for config in configs:
            # transformers reads the attention function by this name at every call: dispatch to the wrapper.
            self._saved.append((config, config._attn_implementation))
            config._attn_implementation = attention.registered_name(config._attn_implementation or "eager")
        if not self.new_cache().compressible:
            warnings.warn(f"{type(self.model).__name__}: every attention layer is sliding-window, and kvcake leaves "
                          "those to transformers' own bounded cache: nothing will be compressed", UserWarning,
                          stacklevel=2)
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._after_hook = self.model.register_forward_hook(self._after_forward, always_call=True)
        if callable(getattr(self.model, "generate", None)):
            # An instance attribute for the block's duration (removed on exit), so that each generate call tells its
            # cache how many tokens it will generate.
            self.model.generate = self._generate  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.model.__dict__.get("generate") == self._generate:
            del self.model.__dict__["generate"]
        for hook in (self._hook, self._after_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._after_hook = None
        if self._feeding is not None:  # a forward that raised: its cache is no longer fed by this block
            self._feeding.feeder, self._feeding = None, None
        for config, name in reversed(self._saved):
            config._attn_implementation = name
        self._saved.clear()
        if self.last_cache is not None and self.last_cache.prompt_tokens is not None:
            try:
                self._report = self.last_cache.report()
            except Exception as exc:  # noqa: BLE001 - kept for press.report: leaving the block must not raise it
                self._report_error = exc
        self.active_cache = None
        self.last_cache = None

    # -- caches ------------------------------------------------------------------------------------------------------
    def new_cache(self, max_new_tokens: int | None = None) -> KVCakeCache:
        """A fresh compressed cache for this model and method (pass it as the model's cache yourself if you like).

        ``max_new_tokens``: how many tokens will be generated, if known, so that the decoding buffers are sized once
        (default: the block's, or the ``generate`` call's).
        """
        cache = KVCakeCache(config=text_config(self.model), method=self.method)
        self._prepare(cache)
        if max_new_tokens is not None:
            cache.decode_horizon = max_new_tokens
        return cache

    # -- compiled decoding ---------------------------------------------------------------------------------------------
    def mode(self) -> str:
        """The torch.compile mode of compiled decoding on this model's device."""
        if self.compile_mode is not None:
            return self.compile_mode
        return "reduce-overhead" if _device(self.model).type == "cuda" else "default"

    @property
    def forward(self) -> Any:
        """The model's forward, compiled once (``fullgraph=True``) when the block compiles, for hand-written decoding
        loops: ``press.forward(token, cache=cache, position_ids=...)``. Without ``compile=True``, the model itself."""
        if not self.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model, fullgraph=True, mode=self.mode())
        return self._compiled

    def _compile_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What ``generate`` needs to compile its decoding steps with our cache (transformers' own mechanism)."""
        from transformers import CompileConfig

        own = self._cache_kwarg()
        given = cache_argument(kwargs, own)
        if given is not None and not isinstance(given, KVCakeCache):
            raise ValueError("compiled decoding under kvcake needs kvcake's cache; pass none (or press.new_cache())")
        cache = given if given is not None else self.new_cache()
        self._compiled_settings(cache.settings)
        config = kwargs.get("compile_config") or CompileConfig(fullgraph=True, mode=self.mode())
        if _device(self.model).type not in ("cuda", "xpu"):
            config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        return {**kwargs, own: cache, "compile_config": config}

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` inside the block: the model's own, told how many tokens it will generate."""
        original = type(self.model).generate.__get__(self.model)  # type: ignore[attr-defined]
        self._call_tokens = _new_tokens(self.model, args, kwargs)
        if drafts.assisted(self.model, kwargs):
            if self.method.decode_eviction:
                raise UnsupportedCacheError(drafts.REFUSAL.format(name=self.method.name))
            self._draft_prompt = drafts.prompt_length(args, kwargs)
        try:
            if self.compile:
                kwargs = self._compile_kwargs(kwargs)
            out = original(*args, **kwargs)
            if self.last_cache is not None:
                self.last_cache.check_finite()
                if self.last_cache.settings.compiled:
                    turns.sync_lengths(self.last_cache)
            return out
        finally:
            self._call_tokens = self._draft_prompt = None

    def _cache_kwarg(self) -> str:
        """The name the model's forward takes its cache under, read once per model."""
        if self._cache_name is None:
            self._cache_name = cache_keyword(self.model)
        return self._cache_name

    def _before_forward(self, module, args, kwargs):
        own_name = self._cache_kwarg()
        cache = cache_argument(kwargs, own_name)
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is not None and inputs.shape[1] == 0:
            raise ValueError("empty prompt: there are no tokens to prefill")
        if cache is None and kwargs.get("use_cache") is False:
            # No cache is kept, so there is nothing to compress (a scoring forward): it runs as without kvcake and
            # is no request of the block's (the report still describes the latest one).
            self.active_cache = None
            return args, kwargs
        if cache is None:
            cache = self.new_cache()
            kwargs[own_name] = cache
        elif not isinstance(cache, KVCakeCache):
            if not isinstance(cache, Cache):
                raise UnsupportedCacheError(f"unexpected cache of type {type(cache).__name__}")
            # The caller's own object becomes the compressed cache, in place (see KVCakeCache.adopt).
            cache = KVCakeCache.adopt(cache, text_config(self.model), self.method)  # type: ignore[arg-type]
            self._prepare(cache)
        else:
            self._continue(cache)
        if self._draft_prompt is not None:  # the first forward of an assisted generate call
            prompt, self._draft_prompt = self._draft_prompt, None
            if not torch.compiler.is_compiling() and cache.plan is None and not cache.get_seq_length():
                args, kwargs = self._prefill_before_drafts(cache, prompt, args, kwargs)
        self._use(cache)
        cache.feeder, self._feeding = self, cache
        kwargs[attention.CACHE_KWARG] = cache
        return args, kwargs

    def _after_forward(self, module, args, output):
        if self._feeding is not None:
            turns.refreeze(self._feeding)
            self._feeding.feeder, self._feeding = None, None
        logits, self._draft_logits = self._draft_logits, None
        if logits is not None and output is not None:  # None: the forward raised
            output.logits = torch.cat([logits, output.logits], dim=1)
        return output

    def _prefill_before_drafts(self, cache: KVCakeCache, prompt: int, args: tuple,
                               kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Assisted and prompt-lookup decoding prefill the prompt and the first draft tokens in one forward. The
        prompt alone is prefilled (and compressed) first, as ordinary decoding does, and the forward goes on with
        the drafts only, on the compressed cache; the prompt's last logits are put back in front of the drafts'."""
        split = drafts.split(args, kwargs, prompt)
        if split is None:
            return args, kwargs
        first, rest_args, rest = split
        out = self.model(**first, **{self._cache_kwarg(): cache}, use_cache=True, logits_to_keep=1)
        self._draft_logits = out.logits[:, -1:]
        return rest_args, rest

    def _continue(self, cache: KVCakeCache) -> None:
        """Check that a kvcake cache the caller passed may go on in this block: made for this model, holding a
        request of an equal method (or none yet). Either mismatch would attend over entries another model wrote, or
        continue a request another method compressed under this one's budgets: refused. Host-side checks, made
        once at the forward that starts a compiled decoding, not inside the compiled steps."""
        if torch.compiler.is_compiling():
            return
        if cache.model_config is not text_config(self.model):
            raise UnsupportedCacheError("this kvcake cache was made for another model; a kvcake cache continues only "
                                        "on the model whose compress block filled it")
        held = cache.get_seq_length()
        if cache.method != self.method:
            if held or cache.plan is not None:
                raise UnsupportedCacheError(
                    f"this kvcake cache holds {held} tokens compressed by {cache.method!r}; this block compresses "
                    f"with {self.method!r}: continue it in a block with an equal method, or start a new request")
            cache.method = self.method  # an empty cache simply takes this block's method
            self._prepare(cache)
        elif held and self._call_tokens is not None:
            cache.decode_horizon = self._call_tokens  # the next turn's generate: its decoding buffers' size

    def _prepare(self, cache: KVCakeCache) -> None:
        """Settings a cache of this block gets (the ones new_cache gives)."""
        settings = cache.settings
        settings.decode_horizon = self._call_tokens or self.max_new_tokens
        settings.tail = self.uncompressed_tail
        if self.compile:
            self._compiled_settings(settings)

    def _compiled_settings(self, settings: Settings) -> None:
        """Compiled decoding: freeze as soon as prefill ends, and trace for the block's one CompiledShape."""
        settings.compiled = True
        settings.freeze_after_prefill = True
        settings.compiled_shape = self._compiled_shape

    def _use(self, cache: KVCakeCache) -> None:
        self._report_error = None
        self.active_cache = cache
        self.last_cache = cache

    @property
    def cache(self) -> KVCakeCache | None:
        """The cache of the latest request (None outside the ``with`` block: it is released on exit)."""
        return self.last_cache

    # -- results -----------------------------------------------------------------------------------------------------
    @property
    def report(self) -> Report:
        """What the latest request did (per-layer budgets, kept lengths, memory now, peak and full)."""
        if self.last_cache is not None and not self.last_cache.compressible:
            raise RuntimeError("nothing was compressed: every attention layer of this model is sliding-window")
        if self.last_cache is not None and self.last_cache.prompt_tokens is not None:
            return self.last_cache.report()
        if self._report_error is not None:
            raise self._report_error
        if self._report is None:
            raise RuntimeError("no request has been prefilled under this compression yet")
        return self._report


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _new_tokens(model: Any, args: tuple, kwargs: dict[str, Any]) -> int | None:
    """How many tokens a ``generate(*args, **kwargs)`` call may generate (None if it cannot be told)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if isinstance(new, int):
        return new
    length = kwargs.get("max_length", getattr(config, "max_length", None))
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(length, int) and isinstance(inputs, torch.Tensor):
        return max(0, length - inputs.shape[-1])
    return None


def compress(model: torch.nn.Module, method: Any, *, max_new_tokens: int | None = None, compile: bool = False,
             compile_mode: str | None = None, uncompressed_tail: int = 0) -> Compression:
    """Attach ``method`` to ``model`` for a ``with`` block; ``generate``/forward calls inside it are compressed.

    ``max_new_tokens``: tokens hand-written loops will generate per request, if known, so that each layer's decoding
    buffers are sized once (``generate`` calls tell it themselves). ``compile=True``: decoding steps run compiled
    (``torch.compile(fullgraph=True)``; CUDA graphs on CUDA with the default ``compile_mode``): ``generate`` compiles
    them through transformers' own mechanism, hand-written loops call ``press.forward``. The first compiled step
    costs the compile (tens of seconds); later steps reuse it. ``uncompressed_tail``: the last this-many tokens of
    every prompt are left out of the compression and kept, as kvpress keeps a chat template's tail (the ``tail``
    protocol, see :func:`kvcake.pipeline.chat_tail_length`); the default 0 compresses the whole prompt, the paper's
    protocol.
    """
    return Compression(model, method, max_new_tokens=max_new_tokens, compile=compile, compile_mode=compile_mode,
                       uncompressed_tail=uncompressed_tail)


__all__ = ["Compression", "UnsupportedCacheError", "UnsupportedModelError", "attention_modules", "cache_keyword",
           "compress", "output_cache",
           "text_config"]
