"""Tensor parallelism in the vLLM engine, without vLLM: two ranks, each holding half of a layer's heads, sum CAKE's
layer statistics over a real gloo all-reduce and keep the same number of entries per layer, the numbers one rank
holding every head keeps, with each head keeping the same entries."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvcake.engines.vllm.paged import PagedLayer
from kvcake.engines.vllm.requests import RequestState
from kvcake.methods.registry import build

KV_HEADS, GROUPS, DIM, BLOCK, PROMPT, LAYERS, RANKS = 2, 2, 8, 4, 48, 4, 2


def _inputs() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Queries ``(S, Hq, D)``, keys and values ``(S, Hkv, D)`` per layer; query head h reads KV head h // GROUPS."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(PROMPT, KV_HEADS * GROUPS, DIM, generator=generator),
             torch.randn(PROMPT, KV_HEADS, DIM, generator=generator),
             torch.randn(PROMPT, KV_HEADS, DIM, generator=generator)) for _ in range(LAYERS)]


def _compress(kv_heads: slice, reduce) -> dict:
    """Score and compact one request over the heads ``kv_heads`` (with their query heads) of every layer."""
    state = RequestState(build("cake", budget=10, window=3), PROMPT, LAYERS, BLOCK, reduce=reduce)
    q_heads = slice(kv_heads.start * GROUPS, kv_heads.stop * GROUPS)
    heads = kv_heads.stop - kv_heads.start
    layers, tables = [], []
    for layer, (query, keys, values) in enumerate(_inputs()):
        table = torch.arange(PROMPT // BLOCK + 2)
        paged = PagedLayer(torch.zeros(len(table), heads, BLOCK, 2 * DIM))
        keys, values = keys[:, kv_heads], values[:, kv_heads]
        paged.write(table, torch.arange(PROMPT).expand(heads, -1), keys.transpose(0, 1), values.transpose(0, 1))
        state.score_layer(layer, query[:, q_heads], keys, values, DIM ** -0.5, None)
        layers.append(paged)
        tables.append(table)
    state.compact(layers, tables)
    return {"counts": [r.count for r in state.regions], "positions": [r.positions for r in state.regions]}


def _rank(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=RANKS)
    calls = []

    def reduce(parts: torch.Tensor) -> torch.Tensor:
        calls.append(parts.clone())
        summed = parts.clone()
        dist.all_reduce(summed)
        return summed

    per_rank = KV_HEADS // RANKS
    got = _compress(slice(rank * per_rank, (rank + 1) * per_rank), reduce)
    torch.save({**got, "reduced": len(calls)}, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_holding_half_the_heads_keep_what_one_rank_keeps(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=RANKS, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(RANKS)]
    whole = _compress(slice(0, KV_HEADS), None)
    assert all(r["reduced"] == LAYERS for r in ranks)  # one all-reduce per layer, on every rank
    assert ranks[0]["counts"] == ranks[1]["counts"] == whole["counts"]
    assert len(set(whole["counts"])) > 1  # the preference did split the budget unevenly: a real check of the sum
    for layer in range(LAYERS):
        together = torch.cat([r["positions"][layer] for r in ranks])
        assert torch.equal(together, whole["positions"][layer])
