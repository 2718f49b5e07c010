"""The scheduler's side of per-layer budgets: one KV-cache group per compressed layer, and a block manager that
returns a layer's leading blocks to vLLM's pool once the worker has moved what the layer keeps past them.

vLLM puts layers whose KV-cache specs differ into different groups, each with its own block table over one shared
pool; :class:`LayerSpec` differs from layer to layer by its ``layer_index`` alone, so every compressed layer gets its
own group and the blocks a request holds follow the sum of its layers' budgets, not its largest layer's budget times
the number of layers.

:class:`LayerBlocks` frees only what the worker reported (:meth:`LayerBlocks.free_before`): the worker never reads a
block before a layer's ``first_block`` again, and the scheduler never frees one the worker still reads. It never
serves a prefix-cache hit: after compaction a block no longer holds the tokens its hash names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry


@dataclass(frozen=True, kw_only=True)
class LayerSpec(FullAttentionSpec):
    """A full-attention layer that kvcake compresses (its own KV-cache group)."""

    layer_index: int = 0

    @classmethod
    def merge(cls, specs: list[Any]) -> Any:
        if not all(spec == specs[0] for spec in specs[1:]):
            raise AssertionError("kvcake: a KV-cache group holds one compressed layer")
        return copy.deepcopy(specs[0])

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return False  # never folded back into one group: each layer keeps its own block table


class LayerBlocks(FullAttentionManager):
    """Block manager of one compressed layer (see the module docstring)."""

    def free_before(self, request_id: str, first_block: int) -> None:
        """Return the request's blocks before ``first_block`` to the pool (they become the null block)."""
        self._remove_blocks_in_range(request_id, 0, first_block)

    def held(self, request_id: str) -> int:
        """Blocks the request holds in this layer (the null block excluded)."""
        return sum(block is not self._null_block for block in self.req_to_blocks.get(request_id, ()))

    def cache_blocks(self, *args: Any, **kwargs: Any) -> None:
        return None

    @classmethod
    def find_longest_cache_hit(cls, block_hashes: Any, max_length: int, kv_cache_group_ids: list[int],
                               *args: Any, **kwargs: Any) -> tuple[tuple[list[Any], ...], int]:
        return tuple([] for _ in kv_cache_group_ids), 0


def register() -> None:
    """Tell vLLM which manager serves :class:`LayerSpec` (in every process; inert unless a layer has that spec)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LayerSpec, LayerBlocks)


__all__ = ["LayerBlocks", "LayerSpec", "register"]
