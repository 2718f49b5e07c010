"""kvcake's vLLM scheduler: vLLM's scheduler, which returns to the pool the blocks each step's compaction emptied."""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from kvcake.engines.vllm import blocks
from kvcake.engines.vllm.worker import checked_settings

logger = init_logger("vllm.kvcake")  # under vLLM's logger: its logging settings apply

#: How many finished requests' block counts :attr:`KVCakeScheduler.held_after_prefill` remembers.
HISTORY = 4096


class KVCakeScheduler(Scheduler):
    """Frees, per compressed layer, the blocks before the first block the worker reported.

    ``held_after_prefill[request_id]``: the blocks the request held in each compressed layer once its prompt was
    compacted, read from the layers' block managers (what vLLM's pool really lent it); ``kept_after_prefill``: the
    entries each layer kept, as the worker reported them.
    """

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        blocks.register()
        self.kvcake = checked_settings(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self.layer_blocks: dict[int, blocks.LayerBlocks] = {}
        for group, manager in zip(self.kv_cache_config.kv_cache_groups, managers, strict=True):
            if isinstance(group.kv_cache_spec, blocks.LayerSpec):
                assert isinstance(manager, blocks.LayerBlocks)
                self.layer_blocks[group.kv_cache_spec.layer_index] = manager
        self.held_after_prefill: dict[str, list[int]] = {}
        self.kept_after_prefill: dict[str, list[int]] = {}
        if vllm_config.cache_config.enable_prefix_caching:
            logger.warning("kvcake: prefix caching serves no hit from the layers kvcake compresses (their blocks no "
                           "longer hold the tokens their hashes name)")
        logger.info("kvcake: %s on %d layers, one KV-cache group each", self.kvcake.method.label,
                    len(self.layer_blocks))

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        reported = getattr(model_runner_output, "kvcake_first_blocks", None) or {}
        for request_id, first_blocks in reported.items():
            for layer, first in enumerate(first_blocks):
                self.layer_blocks[layer].free_before(request_id, first)
        for request_id, kept in (getattr(model_runner_output, "kvcake_kept", None) or {}).items():
            self.kept_after_prefill[request_id] = kept
            self.held_after_prefill[request_id] = [self.layer_blocks[layer].held(request_id)
                                                   for layer in range(len(kept))]
            if len(kept) and self.log_stats:
                logger.info("kvcake: request %s keeps %d of %d entries in %d blocks", request_id, sum(kept),
                            len(kept) * self.requests[request_id].num_prompt_tokens, sum(self.held_after_prefill[
                                request_id]))
            for table in (self.kept_after_prefill, self.held_after_prefill):
                while len(table) > HISTORY:
                    table.pop(next(iter(table)))
        return super().update_from_output(scheduler_output, model_runner_output)


__all__ = ["KVCakeScheduler"]
