"""The vLLM engine's own work per decoding step (decode-time eviction over paged regions), outside vLLM.

SmolLM2's shape (30 layers, 3 KV heads of 64, 9 query heads), a 4,096-token prompt, CAKE at 10%, block size 32, one
thread: milliseconds per step of ``RequestState.decoded`` over every layer plus ``advance``, then a profile.

    OMP_NUM_THREADS=1 python benchmarks/vllm_decode_work.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from kvcake.engines.vllm.paged import PagedLayer
from kvcake.engines.vllm.requests import RequestState
from kvcake.methods.registry import build

HEADS, DIM, BLOCK, Q_HEADS, PROMPT, LAYERS = 3, 64, 32, 9, 4096, 30


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    state = RequestState(build("cake", ratio=0.1), PROMPT, LAYERS, BLOCK)
    pages = []
    for layer in range(LAYERS):
        table = torch.arange(PROMPT // BLOCK + 8)
        paged = PagedLayer(torch.zeros(len(table), HEADS, BLOCK, 2 * DIM))
        keys, values = torch.randn(PROMPT, HEADS, DIM), torch.randn(PROMPT, HEADS, DIM)
        paged.write(table, torch.arange(PROMPT).expand(HEADS, -1), keys.transpose(0, 1), values.transpose(0, 1))
        state.score_layer(layer, torch.randn(PROMPT, Q_HEADS, DIM), keys, values, DIM ** -0.5, None)
        pages.append((paged, table))
    layers, tables = [p for p, _ in pages], [t for _, t in pages]
    state.compact(layers, tables)

    def step() -> None:
        for layer, (paged, table) in enumerate(pages):
            state.decoded(layer, paged, table, torch.randn(1, Q_HEADS, DIM), DIM ** -0.5, None)
        state.advance(layers, tables)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(20):
        step()
    print(f"kept per layer (first 5): {[r.count for r in state.regions][:5]}")
    print(f"ms per step ({LAYERS} layers): {(time.perf_counter() - start) / 20 * 1000:.1f}")
    profile = cProfile.Profile()
    profile.runcall(lambda: [step() for _ in range(10)])
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
