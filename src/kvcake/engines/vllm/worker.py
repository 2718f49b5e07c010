"""kvcake's vLLM worker: vLLM's CPU worker, with kvcake's attention backend, one KV-cache group per compressed layer,
and each step's compaction reported to the scheduler with the step's output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import vllm
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.cpu_worker import CPUWorker

from kvcake.engines.vllm import blocks, register
from kvcake.engines.vllm.engine import Engine, install
from kvcake.engines.vllm.settings import EngineSettings, KVCakeConfigError, check_method, check_vllm


@dataclass
class KVCakeRunnerOutput(ModelRunnerOutput):
    """A step's output, and per request whose regions moved, each compressed layer's first block (and, for prompts
    compacted in the step, the entries each layer kept)."""

    kvcake_first_blocks: dict[str, list[int]] = field(default_factory=dict)
    kvcake_kept: dict[str, list[int]] = field(default_factory=dict)


def checked_settings(vllm_config: Any) -> EngineSettings:
    """The method asked for, after every start-up check (raises :class:`KVCakeConfigError`)."""
    settings = EngineSettings.from_additional_config(vllm_config.additional_config)
    if settings is None:
        raise KVCakeConfigError('kvcake: vLLM runs kvcake\'s scheduler or worker but additional_config has no "kvcake" '
                                'entry; add --additional-config \'{"kvcake": {"method": "cake", "ratio": 0.1}}\'')
    parallel, scheduler = vllm_config.parallel_config, vllm_config.scheduler_config
    check_vllm(version=vllm.__version__, device=current_platform.device_type, scheduler_cls=scheduler.scheduler_cls,
               worker_cls=parallel.worker_cls, tensor_parallel=parallel.tensor_parallel_size,
               pipeline_parallel=parallel.pipeline_parallel_size,
               kv_heads=vllm_config.model_config.get_total_num_kv_heads(),
               speculative=vllm_config.speculative_config is not None,
               kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
               chunked_prefill=bool(scheduler.enable_chunked_prefill),
               max_batched_tokens=scheduler.max_num_batched_tokens,
               max_model_len=vllm_config.model_config.max_model_len)
    check_method(settings.method, parallel.tensor_parallel_size)
    return settings


def _sum_over_ranks(parts: torch.Tensor) -> torch.Tensor:
    """Sum ``parts`` over the tensor-parallel ranks (gloo, on the ranks' CPU group): every rank gets the same sum."""
    from vllm.distributed.parallel_state import get_tp_group

    summed = parts.clone()
    torch.distributed.all_reduce(summed, group=get_tp_group().cpu_group)
    return summed


class KVCakeWorker(CPUWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = checked_settings(self.vllm_config)
        register()  # what the plugin entry point does, in case vLLM runs with plugins filtered (VLLM_PLUGINS)
        parallel = self.vllm_config.parallel_config.tensor_parallel_size > 1
        self.kvcake = Engine(settings.method, self.vllm_config.cache_config.block_size,
                             reduce=_sum_over_ranks if parallel else None)
        install(self.kvcake)

    def get_kv_cache_spec(self) -> dict[str, Any]:
        specs = super().get_kv_cache_spec()
        self.kvcake.layers.clear()
        for name, spec in specs.items():
            if type(spec) is FullAttentionSpec and spec.sliding_window is None and spec.attention_chunk_size is None:
                index = len(self.kvcake.layers)
                values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
                specs[name] = blocks.LayerSpec(**values, layer_index=index)
                self.kvcake.layers[name] = index
        if not self.kvcake.layers:
            raise KVCakeConfigError("kvcake: this model has no full-attention layer kvcake can compress")
        first = next(spec for name, spec in specs.items() if name in self.kvcake.layers)
        self._check_layout(first)
        self._check_backend()
        return specs

    def _check_backend(self) -> None:
        """Every compressed layer runs kvcake's attention, or the engine refuses to start (a layer whose backend vLLM
        chose before kvcake's was registered would decode over blocks it never compacted)."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        from kvcake.engines.vllm.backend import KVCakeCPUBackend

        layers = get_layers_from_vllm_config(self.vllm_config, Attention, list(self.kvcake.layers))
        wrong = sorted(name for name, layer in layers.items()
                       if not issubclass(layer.get_attn_backend(), KVCakeCPUBackend))
        if wrong or len(layers) != len(self.kvcake.layers):
            raise KVCakeConfigError(f"kvcake: {len(wrong) or 'some'} attention layers do not run kvcake's backend "
                                    f"(e.g. {(wrong or ['?'])[0]}); was vLLM already started in this process "
                                    "without kvcake? Start the kvcake engine in a fresh process")

    def _check_layout(self, spec: Any) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from kvcake.engines.vllm.paged import check_layout

        isa = _get_attn_isa(spec.dtype, spec.block_size, spec.head_size, "auto")

        def write(key, value, kv_cache, slots):
            halves = kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], 2 * kv_cache.shape[2], -1)
            key_cache, value_cache = halves.chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                           kv_cache_dtype="auto")

        check_layout(write, spec.dtype, spec.num_kv_heads, spec.head_size, spec.block_size)

    def execute_model(self, scheduler_output: Any) -> Any:
        self.kvcake.runner = self.model_runner
        self.kvcake.begin_step(scheduler_output)
        return self._with_report(super().execute_model(scheduler_output))

    def sample_tokens(self, grammar_output: Any) -> Any:
        return self._with_report(super().sample_tokens(grammar_output))

    def _with_report(self, output: Any) -> Any:
        if not isinstance(output, ModelRunnerOutput) or not self.kvcake.first_blocks:
            return output
        values = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        first_blocks, kept = self.kvcake.end_step()
        return KVCakeRunnerOutput(**values, kvcake_first_blocks=first_blocks, kvcake_kept=kept)


__all__ = ["KVCakeRunnerOutput", "KVCakeWorker", "checked_settings"]
