"""kvcake's vLLM scheduler: vLLM's scheduler, which returns to the pool the blocks each step's compaction emptied."""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from kvcake.engines.vllm import blocks
from kvcake.engines.vllm.worker import checked_settings

logger = logging.getLogger("kvcake.vllm")

#: How many finished requests' block counts :attr:`KVCakeScheduler.held_after_prefill` remembers.
HISTORY = 4096


class KVCakeScheduler(Scheduler):
    """Frees, per compressed layer, the blocks before the first block the worker reported.

    ``held_after_prefill[request_id]``: the blocks the request held in each compressed layer once its prompt was
    compacted, read from the layers' block managers (what vLLM's pool really lent it).
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
        if vllm_config.cache_config.enable_prefix_caching:
            logger.warning("kvcake: prefix caching serves no hit from the layers kvcake compresses (their blocks no "
                           "longer hold the tokens their hashes name)")
        logger.info("kvcake: %s on %d layers, one KV-cache group each", self.kvcake.method.label,
                    len(self.layer_blocks))

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        reported = getattr(model_runner_output, "kvcake_first_blocks", None) or {}
        for request_id, first_blocks in reported.items():
            fresh = request_id not in self.held_after_prefill
            for layer, first in enumerate(first_blocks):
                self.layer_blocks[layer].free_before(request_id, first)
            if fresh:
                self.held_after_prefill[request_id] = [self.layer_blocks[layer].held(request_id)
                                                       for layer in range(len(first_blocks))]
                while len(self.held_after_prefill) > HISTORY:
                    self.held_after_prefill.pop(next(iter(self.held_after_prefill)))
        return super().update_from_output(scheduler_output, model_runner_output)


__all__ = ["KVCakeScheduler"]
