"""Why compiled decoding does not trace each layer's slot attention once and reuse it for every layer: torch's
``nested_compile_region`` reuses a traced region only for inputs of the same shape, and with the slot axis dynamic
each layer's capacity is its own symbol, so layers of different capacities (CAKE's) get a region each.

Compiles a function that calls one region (a layer's slot attention: logits, the free-slot mask, softmax, values)
once per layer, for layers of equal and of different capacities, and counts the regions torch traced; then runs the
compiled step on a second request whose layers have other capacities (as CAKE's next prompt would), and counts the
graphs. Reuse over layers of equal capacities comes at a price: the region ties their sizes to one symbol, so the
next request with unequal capacities recompiles (without regions, each layer keeps its own symbol and does not).

    python benchmarks/region_reuse.py --layers 8
"""

from __future__ import annotations

import argparse
import time

import torch


def slot_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """A layer's attention over its slots, free slots (position -1) masked, as compiled decoding computes it."""
    logits = torch.matmul(query, keys.transpose(-1, -2)) * query.shape[-1] ** -0.5
    logits = logits + positions.clamp(max=0).to(logits.dtype).unsqueeze(2) * torch.finfo(logits.dtype).max
    return torch.matmul(torch.softmax(logits, dim=-1), values)


#: The same, as a region torch traces once and reuses where it can.
slot_attention_region = torch.compiler.nested_compile_region(slot_attention)


def _layers(capacities: list[int], heads: int = 2, dim: int = 16) -> list[tuple[torch.Tensor, ...]]:
    layers = []
    for capacity in capacities:
        keys, values = torch.randn(1, heads, capacity, dim), torch.randn(1, heads, capacity, dim)
        positions = torch.arange(capacity).expand(1, heads, capacity).clone()
        for t in (keys, values, positions):
            torch._dynamo.mark_dynamic(t, 2)  # the slot axis, dynamic as in compiled decoding
        layers.append((keys, values, positions))
    return layers


def compile_step(capacities: list[int], later: list[int], region: bool) -> tuple[int, int, float]:
    """Regions in the compiled graph of a step over layers of ``capacities``, the graphs compiled once a second
    request with layers of ``later`` capacities ran too, and the first compilation's time."""
    torch._dynamo.reset()
    state = {"layers": _layers(capacities)}
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return graph.forward

    attend = slot_attention_region if region else slot_attention

    def step(query):
        out = query
        for keys, values, positions in state["layers"]:
            out = attend(out, keys, values, positions)
        return out

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    query = torch.randn(1, 2, 1, 16)
    begin = time.perf_counter()
    compiled(query)
    seconds = time.perf_counter() - begin
    regions = [name for name, _ in graphs[0].named_children() if name.startswith("subgraph")]
    state["layers"] = _layers(later)
    compiled(query)
    return len(regions), len(graphs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    equal, different = [512] * args.layers, [64 * (n + 1) for n in range(args.layers)]
    later = [96 * (n + 1) for n in range(args.layers)]
    print(f"torch {torch.__version__}, {args.layers} layers, slot axis dynamic; the second request's layers have "
          f"capacities {later[0]}-{later[-1]}")
    print(f"{'step':42} {'regions':>8} {'graphs after 2 requests':>24} {'first compile':>14}")
    for name, capacities, region in [("one region per call, equal capacities", equal, True),
                                     ("one region per call, different capacities", different, True),
                                     ("no region, equal capacities", equal, False),
                                     ("no region, different capacities", different, False)]:
        regions, graphs, seconds = compile_step(capacities, later, region)
        print(f"{name:42} {regions:8d} {graphs:24d} {seconds:12.2f} s")


if __name__ == "__main__":
    main()
