"""The vLLM engine's own work per decoding step (decode-time eviction over paged regions), outside vLLM.

SmolLM2's shape (30 layers, 3 KV heads of 64, 9 query heads), vLLM's CPU block size (128), CAKE at 10%, one thread:
milliseconds per step for a batch of requests, in interleaved rounds of

* ``per-layer``: each layer's eviction right after its attention (``decode_layers`` called with one layer at a
  time, as the backend did before it batched the layers);
* ``one-batch``: every layer's eviction in one batch after the last layer (what the backend does),

each followed by ``advance``; then a profile of the second. Both keep the same entries (tests/test_vllm_paged.py).

    OMP_NUM_THREADS=1 python benchmarks/vllm_decode_work.py --requests 10 --prompt 2200
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from kvcake.engines.vllm.paged import PagedLayer
from kvcake.engines.vllm.requests import RequestState, decode_layers
from kvcake.methods.registry import build

HEADS, DIM, BLOCK, Q_HEADS, LAYERS = 3, 64, 128, 9, 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=2200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    method = build("cake", ratio=0.1)
    per_request = -(-(args.prompt + BLOCK * (args.rounds * 2 * args.steps // BLOCK + 2)) // BLOCK)
    layers = [PagedLayer(torch.randn(per_request * args.requests, HEADS, BLOCK, 2 * DIM)) for _ in range(LAYERS)]
    tables = [[torch.randperm(per_request * args.requests)[:per_request] for _ in range(args.requests)]
              for _ in range(LAYERS)]  # each layer's block table of each request, from one pool per layer
    states = []
    for row in range(args.requests):
        state = RequestState(method, args.prompt, LAYERS, BLOCK)
        for layer in range(LAYERS):
            state.score_layer(layer, torch.randn(args.prompt, Q_HEADS, DIM), torch.randn(args.prompt, HEADS, DIM),
                              torch.randn(args.prompt, HEADS, DIM), DIM ** -0.5, None)
        state.compact(layers, [tables[layer][row] for layer in range(LAYERS)])
        states.append(state)

    def step(batched: bool) -> None:
        queries = [torch.randn(args.requests, Q_HEADS, DIM) for _ in range(LAYERS)]
        if batched:
            decode_layers(states, list(range(LAYERS)), layers, tables, queries, DIM ** -0.5, None)
        else:
            for layer in range(LAYERS):
                decode_layers(states, [layer], [layers[layer]], [tables[layer]], [queries[layer]], DIM ** -0.5, None)
        for row, state in enumerate(states):
            state.advance(layers, [tables[layer][row] for layer in range(LAYERS)])

    print(f"{args.requests} requests of {args.prompt} tokens; kept per layer (first 5): "
          f"{[r.count for r in states[0].regions][:5]}")
    for round_ in range(args.rounds):
        for name, batched in (("per-layer", False), ("one-batch", True)):
            step(batched)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(batched)
            ms = (time.perf_counter() - start) / args.steps * 1000
            print(f"round {round_ + 1} {name}: {ms:.1f} ms per step ({ms / LAYERS:.2f} ms per layer)")
    profile = cProfile.Profile()
    profile.runcall(lambda: [step(True) for _ in range(5)])
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
