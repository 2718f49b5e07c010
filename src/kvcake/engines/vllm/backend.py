"""vLLM's CPU attention, with kvcake's compressed layers: vLLM's own kernel over each request's region.

Registered by the plugin in place of ``CPU_ATTN``; in a worker that does not run kvcake it is vLLM's CPU attention
unchanged, and it refuses to start where ``additional_config`` asks for kvcake without kvcake's scheduler and worker
(the request would otherwise be served uncompressed). For a layer kvcake compresses:

* the metadata builder gives every request that decodes over a compacted region the block table from the region's
  first block, a sequence length of the region plus the new tokens, and the slots at the region's end for the new
  tokens (:meth:`KVCakeMetadataBuilder.build`);
* the attention writes new tokens there, runs vLLM's kernel, then scores prompts that end in this step and keeps the
  decoding requests' queries; after the last layer every layer's decode-time eviction runs in one batch and the
  prompts that ended are compacted (:mod:`kvcake.engines.vllm.requests`).

Prompts are attended in full, as vLLM does: scoring and compaction happen once the whole prompt was computed, so
the kept entries are the cascade's (one-shot and cascade keep the same entries), while the prompt's blocks are held
until the step ends.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from kvcake.engines.vllm.engine import Engine, current
from kvcake.engines.vllm.paged import PagedLayer
from kvcake.engines.vllm.requests import decode_layers
from kvcake.engines.vllm.settings import EngineSettings
from kvcake.engines.vllm.worker import checked_settings


@dataclass
class KVCakeMetadata(CPUAttentionMetadata):
    """vLLM's metadata, plus each request's whole block table (``block_table`` starts at the region)."""

    full_block_table: torch.Tensor | None = None


def _compressed(layer_name: str) -> tuple[Engine, int] | None:
    engine = current()
    if engine is None or layer_name not in engine.layers:
        return None
    return engine, engine.layers[layer_name]


class KVCakeMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if current() is None and EngineSettings.from_additional_config(vllm_config.additional_config) is not None:
            checked_settings(vllm_config)  # kvcake asked for without its scheduler and worker: refused, never ignored

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        found = _compressed(self.layer_names[0]) if len(self.layer_names) == 1 else None
        if found is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        engine, layer = found
        common = common_attn_metadata
        tables = common.block_table_tensor
        shifted, seq_lens, slots = tables.clone(), common.seq_lens.clone(), common.slot_mapping.clone()
        starts = common.query_start_loc_cpu.tolist()
        bs = self.block_size
        decoding = [(i, state.regions[layer]) for i, row in enumerate(engine.rows())
                    if (state := engine.decoding(row)) is not None]
        if decoding:  # every decoding request at once; each computes one token, written at its region's end
            assert all(starts[i + 1] - starts[i] == 1 for i, _ in decoding), "a decoding request computes one token"
            rows = torch.tensor([i for i, _ in decoding], device=tables.device)
            firsts = torch.tensor([region.first_block for _, region in decoding], device=tables.device)
            counts = torch.tensor([region.count for _, region in decoding], device=tables.device)
            own = tables[rows]
            span = torch.arange(tables.shape[1], device=tables.device)
            moved = own.gather(1, (firsts[:, None] + span).clamp(max=tables.shape[1] - 1))
            shifted[rows] = torch.where(span < tables.shape[1] - firsts[:, None], moved, own)  # from the first block
            seq_lens[rows] = (counts + 1).to(seq_lens.dtype)
            end = firsts * bs + counts  # the region's next slot
            slots[[starts[i] for i, _ in decoding]] = (own.gather(1, (end // bs)[:, None])[:, 0] * bs + end % bs
                                                       ).to(slots.dtype)
        common = replace(common, block_table_tensor=shifted, seq_lens=seq_lens, slot_mapping=slots,
                         max_seq_len=int(seq_lens[: len(starts) - 1].max()))
        metadata = super().build(common_prefix_len, common, fast_build)
        values = {f.name: getattr(metadata, f.name) for f in fields(metadata)}
        return KVCakeMetadata(**values, full_block_table=tables)


class KVCakeImpl(CPUAttentionBackendImpl):
    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        own = metadata.get(layer.layer_name) if isinstance(metadata, dict) else None
        if isinstance(own, KVCakeMetadata):
            slot_mapping = own.slot_mapping  # new tokens go to the end of their region
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor, output_scale: Any = None,
                output_block_scale: Any = None) -> torch.Tensor:
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        found = _compressed(layer.layer_name)
        if found is None or not isinstance(attn_metadata, KVCakeMetadata):
            return out
        engine, index = found
        softcap = self.logits_soft_cap or None
        starts = attn_metadata.query_start_loc.tolist()
        ended, rows = [], []
        for i, row in enumerate(engine.rows()):
            lo, hi = starts[i], starts[i + 1]
            if row.ends_prompt:
                if row.computed != 0:
                    raise RuntimeError(f"kvcake: request {row.req_id}'s prompt was split across steps; the vLLM engine "
                                       "scores a prompt in one step (enable_chunked_prefill=False)")
                engine.state(row).score_layer(index, query[lo:hi], key[lo:hi], value[lo:hi], self.scale, softcap)
                ended.append(row)
            elif engine.decoding(row) is not None:
                assert hi - lo == 1, "a decoding request computes one token per step"
                rows.append(i)
        if rows:  # evicted after the last layer, with every other layer's (decode_layers)
            engine.queries[index] = query[[starts[i] for i in rows]]
        if index == len(engine.layers) - 1:
            self._after_last_layer(engine, ended, self.scale, softcap)
        return out

    @staticmethod
    def _after_last_layer(engine: Engine, ended: list[Any], scale: float, softcap: float | None) -> None:
        """Every layer's decode-time eviction in one batch, then compact the prompts that ended and move regions that
        passed a block; note every first block that changed."""
        context = get_forward_context()
        names = list(engine.layers)
        layers = [PagedLayer(context.no_compile_layers[name].kv_cache) for name in names]
        metadata = [context.attn_metadata[name] for name in names]
        decoding = [(i, state) for i, row in enumerate(engine.rows()) if (state := engine.decoding(row)) is not None]
        if decoding:
            assert sorted(engine.queries) == list(range(len(names))), "every layer attends before the eviction"
            decode_layers([state for _, state in decoding], list(range(len(names))), layers,
                          [[m.full_block_table[i] for i, _ in decoding] for m in metadata],
                          [engine.queries[index] for index in range(len(names))], scale, softcap)
        engine.queries = {}
        for i, row in enumerate(engine.rows()):
            tables = [m.full_block_table[i] for m in metadata]
            state = engine.requests.get(row.req_id)
            if row in ended:
                assert state is not None
                engine.first_blocks[row.req_id] = state.compact(layers, tables)
                engine.kept[row.req_id] = [region.count for region in state.regions]
            elif state is not None and engine.decoding(row) is not None:
                moved = state.advance(layers, tables)
                if moved is not None:
                    engine.first_blocks[row.req_id] = moved


class KVCakeCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[KVCakeImpl]:
        return KVCakeImpl

    @staticmethod
    def get_builder_cls() -> type[KVCakeMetadataBuilder]:
        return KVCakeMetadataBuilder


__all__ = ["KVCakeCPUBackend", "KVCakeImpl", "KVCakeMetadata", "KVCakeMetadataBuilder"]
