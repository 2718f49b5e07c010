"""The vLLM engine's start-up checks, without vLLM: every bad configuration is refused with one clear line."""

from __future__ import annotations

import pytest

from kvcake.engines.vllm.settings import (
    SCHEDULER_CLS,
    WORKER_CLS,
    EngineSettings,
    KVCakeConfigError,
    check_method,
    check_vllm,
    engine_args,
)
from kvcake.methods.base import Allocator
from kvcake.methods.cake import CAKE
from kvcake.methods.registry import build

GOOD_VLLM = dict(version="0.32.0", device="cpu", scheduler_cls=SCHEDULER_CLS, worker_cls=WORKER_CLS,
                 tensor_parallel=1, pipeline_parallel=1, kv_heads=2, speculative=False, kv_cache_dtype="auto",
                 chunked_prefill=False, max_batched_tokens=2048, max_model_len=4096)


def settings(**config):
    return EngineSettings.from_additional_config({"kvcake": config})


def test_not_asked_changes_nothing():
    assert EngineSettings.from_additional_config({}) is None
    assert EngineSettings.from_additional_config({"other_plugin": {"x": 1}}) is None
    assert EngineSettings.from_additional_config(None) is None


def test_the_method_is_built_by_the_registry():
    got = settings(method="cake", ratio=0.1, gamma=300.0)
    assert got is not None and got.name == "cake"
    assert got.method.ratio == 0.1 and got.method.gamma == 300.0 and got.method.decode_eviction
    snap = settings(method="snapkv", budget=128, window=16)
    assert snap is not None and snap.method.budget == 128 and snap.method.window == 16


@pytest.mark.parametrize("config, words", [
    ({"method": "nope", "ratio": 0.1}, "unknown method 'nope'"),
    ({"method": "cake", "budget": 0}, "budget must be a positive"),
    ({"method": "cake", "budget": -5}, "budget must be a positive"),
    ({"method": "cake", "ratio": 0.0}, "ratio must be in (0, 1]"),
    ({"method": "cake", "ratio": 1.5}, "ratio must be in (0, 1]"),
    ({"method": "cake"}, "give exactly one of budget"),
    ({"method": "cake", "ratio": 0.1, "budget": 64}, "give exactly one of budget"),
    ({"method": "cake", "ratio": 0.1, "kernal": 5}, "has no parameter(s) kernal"),
    ({"ratio": 0.1}, 'needs "method"'),
    ({"method": "full"}, "means no eviction"),
    ({"method": "ada-snapkv", "ratio": 0.1}, "Ada-KV"),
    ({"method": "expected-attention", "ratio": 0.1}, "rotary embedding"),
])
def test_bad_method_settings_are_one_clear_line(config, words):
    with pytest.raises(KVCakeConfigError) as caught:
        settings(**config)
    message = str(caught.value)
    assert message.startswith("kvcake: ") and "\n" not in message and words in message, message


def test_settings_that_are_not_an_object_are_refused():
    with pytest.raises(KVCakeConfigError, match="must be an object"):
        EngineSettings.from_additional_config({"kvcake": "cake"})


@pytest.mark.parametrize("change, words", [
    ({"version": "0.31.1"}, "vLLM 0.31.1 is not supported"),
    ({"version": "0.33.0"}, "vLLM 0.33.0 is not supported"),
    ({"device": "cuda"}, "CPU platform only"),
    ({"scheduler_cls": None}, "--scheduler-cls"),
    ({"worker_cls": "vllm.v1.worker.cpu_worker.CPUWorker"}, "--worker-cls"),
    ({"tensor_parallel": 4}, "more than the model's 2 KV heads"),
    ({"pipeline_parallel": 2}, "pipeline_parallel_size=1"),
    ({"speculative": True}, "speculative decoding"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype=auto"),
    ({"chunked_prefill": True, "max_batched_tokens": 512}, "max_num_batched_tokens >= max_model_len"),
])
def test_bad_vllm_settings_are_one_clear_line(change, words):
    check_vllm(**GOOD_VLLM)
    with pytest.raises(KVCakeConfigError) as caught:
        check_vllm(**{**GOOD_VLLM, **change})
    message = str(caught.value)
    assert message.startswith("kvcake: ") and "\n" not in message and words in message, message


def test_tensor_parallelism_up_to_the_kv_heads_is_accepted():
    check_vllm(**{**GOOD_VLLM, "tensor_parallel": 2})


class _Opaque(Allocator):
    """A preference from each layer that does not say how it adds up over heads."""

    def weights(self, num_layers):
        return None

    def preference(self, view, window):
        return view.query.new_ones(1)


def test_tensor_parallelism_needs_a_preference_that_adds_up_over_heads():
    for name in ("cake", "snapkv", "pyramidkv", "streamingllm"):
        check_method(build(name, ratio=0.1), tensor_parallel=2)  # CAKE's H and V are sums over heads; others fixed
    opaque = CAKE(ratio=0.1, allocator=_Opaque())
    check_method(opaque, tensor_parallel=1)
    with pytest.raises(KVCakeConfigError, match="cannot be summed over the heads"):
        check_method(opaque, tensor_parallel=2)


def test_chunked_prefill_is_fine_when_a_whole_prompt_fits_one_chunk():
    check_vllm(**{**GOOD_VLLM, "chunked_prefill": True, "max_batched_tokens": 4096})


def test_engine_args_carry_the_method_and_kvcakes_classes():
    args = engine_args("cake", ratio=0.1, gamma=300.0)
    assert args["additional_config"] == {"kvcake": {"method": "cake", "ratio": 0.1, "gamma": 300.0}}
    assert args["scheduler_cls"] == SCHEDULER_CLS and args["worker_cls"] == WORKER_CLS
    assert args["enable_prefix_caching"] is False
    with pytest.raises(KVCakeConfigError, match="ratio must be in"):
        engine_args("cake", ratio=2.0)
